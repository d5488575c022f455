"""Expand a sweep's grid into run points: resolved, validated configs with names that encode them.

Every point is built and validated in memory first; only when all of them pass is anything written:
one directory per point (`config.yaml`, `point.json`), `plan.json` listing them, and a copy of the
sweep file. A point's config fixes `training.train_steps` (from its token budget) and
`training.output_dir` (its directory); data.seed and training.seed come from the base config and
are the same for every point, so all points read the same data in the same order.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any

from calm_dist.config import (
    ConfigError, JobConfig, config_from_dict, config_to_dict, load_config, save_config, validate,
)
from calm_dist.flops import training_flops_per_token
from calm_dist.models.param_counts import baseline_param_count, calm_param_count
from calm_dist.sweep.spec import OVERRIDE_PREFIX, SweepError, SweepSpec, override_text
from calm_dist.training.run_dir import mark_run_dir

PLAN_FILE = "plan.json"
POINT_FILE = "point.json"


def fmt_tokens(n: int) -> str:
    """2097152 -> 2.1M, 500000 -> 500k."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)


def fmt_float(x: float) -> str:
    """1e-3 -> 1e-3, 3e-4 -> 3e-4, 2.5e-4 -> 2.5e-4, 0.1 -> 1e-1."""
    mant, exp = f"{x:.3e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def _value_text(v: Any) -> str:
    text = fmt_float(v) if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)
    return "".join(c if c.isalnum() or c in ".+-" else "_" for c in text)


def point_name(cfg: JobConfig, tokens: int, generic: dict[str, Any]) -> str:
    """Megatron-DeepSpeed style: stage, K (CALM), width, depth, tokens, lr, then any override axes."""
    m = cfg.model
    parts = [cfg.training.stage]
    if cfg.training.stage == "calm":
        parts.append(f"K{m.patch_size}")
    parts += [f"d{m.hidden_size}", f"L{m.num_layers}", f"tok{fmt_tokens(tokens)}", f"lr{fmt_float(cfg.optimizer.lr)}"]
    parts += [f"{key.split('.')[-1]}{_value_text(v)}" for key, v in generic.items()]
    return "_".join(parts)


def build_points(spec: SweepSpec, out_dir: Path) -> list[dict[str, Any]]:
    """All points of the grid, validated; raises SweepError naming the first bad point."""
    axes = list(spec.axes)
    points: dict[str, dict[str, Any]] = {}
    for values in itertools.product(*(spec.axes[a] for a in axes)):
        combo = dict(zip(axes, values))
        label = ", ".join(f"{a}={v}" for a, v in combo.items())
        overrides = list(spec.overrides)
        size = combo.get("model")
        if size is not None:
            overrides += spec.sizes[size]
        if "stage" in combo:
            overrides.append(f"training.stage={combo['stage']}")
        if "lr" in combo:
            overrides.append(override_text("optimizer.lr", combo["lr"]))
        generic = {a[len(OVERRIDE_PREFIX):]: v for a, v in combo.items() if a.startswith(OVERRIDE_PREFIX)}
        overrides += [override_text(k, v) for k, v in generic.items()]
        try:
            cfg = load_config(spec.base, overrides)
            stage = cfg.training.stage
            if stage not in ("calm", "baseline"):
                raise SweepError(f"point ({label}): training.stage is {stage!r}; a sweep trains calm or baseline")
            k = combo.get("patch_size", cfg.model.patch_size)
            if stage == "calm":  # the baseline has no K: its copies across the K axis are one point
                extra = [f"model.patch_size={k}", f"autoencoder.patch_size={k}"]
                if "patch_size" in combo:  # latent size rule l = 32 K (CALM.md §1.2)
                    extra += [f"model.latent_size={32 * k}", f"autoencoder.latent_size={32 * k}"]
                if k in spec.autoencoders:
                    extra.append(f"training.autoencoder_path={spec.autoencoders[k]}")
                elif "patch_size" in combo:
                    raise SweepError(f"point ({label}): no autoencoder for K={k}: add it to 'autoencoders:' "
                                     f"in the sweep file (K: path of a trained autoencoder)")
                cfg = load_config(spec.base, overrides + extra)
            valid = validate(cfg, world_size=spec.world_size)
            tokens_per_step = valid.derived.tokens_per_step
            steps = math.ceil(combo["tokens"] / tokens_per_step) if "tokens" in combo else valid.training.train_steps
            cfg.training.train_steps = steps
            cfg.training.global_batch_size = valid.derived.global_batch_size  # fixes tokens per step
            cfg.training.gradient_accumulation_steps = 0
            valid = validate(cfg, world_size=spec.world_size)
        except ConfigError as e:
            raise SweepError(f"point ({label}) fails validation: {e}") from None
        ae_path = valid.training.autoencoder_path
        if stage == "calm" and not (ae_path and Path(ae_path).exists()):
            raise SweepError(f"point ({label}): training.autoencoder_path {ae_path!r} "
                             f"does not exist: train the autoencoder first (or fix 'autoencoders:')")
        tokens = steps * tokens_per_step
        name = point_name(valid, tokens, generic)
        cfg.training.output_dir = str((out_dir / name).resolve())
        if name in points:
            if points[name]["config"] == config_to_dict(cfg):
                continue  # e.g. the baseline across the K axis: one point
            raise SweepError(f"points ({label}) and ({points[name]['label']}) share the name {name} but "
                             f"differ in settings the name does not encode: make the sizes differ in "
                             f"width or depth, or sweep the other setting as an override:<key> axis")
        params = calm_param_count(valid.model) if stage == "calm" else baseline_param_count(valid.model)
        points[name] = {
            "name": name, "label": label, "axes": combo, "stage": stage, "size": size,
            "K": valid.model.patch_size if stage == "calm" else None,
            "hidden_size": valid.model.hidden_size, "num_layers": valid.model.num_layers,
            "lr": valid.optimizer.lr, "train_steps": steps, "tokens_per_step": tokens_per_step,
            "tokens": tokens, "tokens_requested": combo.get("tokens"), "params": params,
            "flops_per_token": training_flops_per_token(valid), "world_size": spec.world_size,
            "config": config_to_dict(cfg),
        }
    if not points:
        raise SweepError("empty grid: the sweep has no points")
    seeds = {(p["config"]["data"]["seed"], p["config"]["training"]["seed"]) for p in points.values()}
    if len(seeds) > 1:
        raise SweepError(f"points differ in (data.seed, training.seed) {sorted(seeds)}: a sweep keeps them fixed")
    return list(points.values())


def write_plan(spec: SweepSpec, out_dir: Path, force: bool = False) -> list[dict[str, Any]]:
    """Build (and validate) every point, then write the sweep directory. An existing plan is left
    alone when identical, and refused when different unless `force` (run outputs are never deleted)."""
    out_dir = Path(out_dir)
    points = build_points(spec, out_dir)
    plan = {"name": spec.name, "sweep_file": str(spec.source), "world_size": spec.world_size,
            "slurm": vars(spec.slurm), "points": [p["name"] for p in points]}
    old = out_dir / PLAN_FILE
    if old.exists() and not force:
        previous = json.loads(old.read_text())
        same = previous == plan and all(
            json.loads((out_dir / p["name"] / POINT_FILE).read_text()) == _jsonable(p) for p in points
            if (out_dir / p["name"] / POINT_FILE).exists())
        if same:
            for p in points:  # a plan laid out before output directories were marked
                mark_run_dir(out_dir / p["name"])
            return points
        raise SweepError(f"{out_dir} already holds a different plan ({old}): use another --out, or --force "
                         f"to rewrite the plan (run outputs are kept)")
    for p in points:
        d = out_dir / p["name"]
        mark_run_dir(d)  # the point's training.output_dir: calm-dist's own, config.yaml included
        save_config(config_from_dict(p["config"]), d / "config.yaml")
        (d / POINT_FILE).write_text(json.dumps(_jsonable(p), indent=2) + "\n")
    shutil.copyfile(spec.source, out_dir / "sweep.yaml")
    (out_dir / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
    return points


def _jsonable(p: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in p.items() if k != "config"}))


def read_plan(sweep_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    sweep_dir = Path(sweep_dir)
    f = sweep_dir / PLAN_FILE
    if not f.is_file():
        raise SweepError(f"{sweep_dir} is not a sweep directory (no {PLAN_FILE}): run `calm-sweep plan` first")
    plan = json.loads(f.read_text())
    points = []
    for name in plan["points"]:
        pf = sweep_dir / name / POINT_FILE
        if not pf.is_file():
            raise SweepError(f"{pf} is missing: re-run `calm-sweep plan`")
        mark_run_dir(sweep_dir / name)  # a point laid out before output directories were marked
        points.append(json.loads(pf.read_text()))
    return plan, points
