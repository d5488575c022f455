"""Read and check a sweep file (docs/sweeps.md): a base config, common overrides and named axes.

Only the file's own structure is checked here (keys, axis names, value types, non-empty axes);
the configs of the points are validated by `plan.py`, all of them before anything is written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from calm_dist.config.loader import _YamlLoader

AXES = ("stage", "model", "patch_size", "tokens", "lr")  # plus override:<section.key>
OVERRIDE_PREFIX = "override:"
STAGES = ("calm", "baseline")
_TOP_KEYS = ("name", "base", "overrides", "axes", "sizes", "autoencoders", "world_size", "slurm")
_SLURM_KEYS = ("sbatch_args", "train_script", "max_concurrent")
_FIXED_KEYS = ("data.seed", "training.seed", "training.output_dir", "training.train_steps")
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}


class SweepError(ValueError):
    """A sweep file, plan or sweep directory is unusable; the message names the key, axis or point."""


@dataclass
class SlurmSettings:
    sbatch_args: list[str] = field(default_factory=list)  # e.g. ["--partition=gpu", "--gres=gpu:1"]
    train_script: str = ""  # "" : slurm/train.sbatch when it exists, else python -m calm_dist.train
    max_concurrent: int = 0  # the array's %N throttle; 0: none


@dataclass
class SweepSpec:
    name: str
    base: list[str]  # presets or files (resolved against the sweep file's folder)
    overrides: list[str]  # section.key=value
    axes: dict[str, list[Any]]  # in file order; the grid is their product
    sizes: dict[str, list[str]]  # size name -> overrides
    autoencoders: dict[int, str]  # K -> trained autoencoder directory (absolute)
    world_size: int = 1
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    source: Path = Path(".")


def override_text(key: str, value: Any) -> str:
    """`section.key=value`, with non-strings written as JSON (which YAML reads back unchanged)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def parse_tokens(value: Any, where: str) -> int:
    """An int, or a string with a k/M/G/B/T suffix: 2M, 1.5G."""
    if isinstance(value, bool):
        raise SweepError(f"{where}: token count must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        tokens = value
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([kKmMgGbBtT]?)\s*", str(value))
        if not m:
            raise SweepError(f"{where}: cannot read {value!r} as a token count (e.g. 2000000, 2M, 1.5G)")
        tokens = float(m.group(1)) * _SUFFIX.get(m.group(2).lower(), 1)
    if tokens <= 0:
        raise SweepError(f"{where}: token count must be positive, got {value!r}")
    return int(round(tokens))


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_YamlLoader)
    except FileNotFoundError:
        raise SweepError(f"sweep file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping with keys {', '.join(_TOP_KEYS)}")
    src = str(path)
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise SweepError(f"{src}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_TOP_KEYS)}")
    here = path.resolve().parent

    name = raw.get("name") or path.stem
    if not re.fullmatch(r"[\w.-]+", str(name)):
        raise SweepError(f"{src}: name {name!r} may hold only letters, digits, '_', '.', '-'")
    base = raw.get("base") or []
    base = [base] if isinstance(base, str) else base
    if not base or not all(isinstance(b, str) for b in base):
        raise SweepError(f"{src}: 'base' must list at least one preset name or config file")
    base = [str(here / b) if (here / b).is_file() else b for b in base]

    sizes = {}
    for size, body in (raw.get("sizes") or {}).items():
        if not isinstance(body, dict) or not body:
            raise SweepError(f"{src}: sizes.{size} must map keys to values, e.g. {{model.hidden_size: 256}}")
        sizes[str(size)] = [override_text(k if "." in k else f"model.{k}", v) for k, v in body.items()]

    autoencoders = {}
    for k, ae_path in (raw.get("autoencoders") or {}).items():
        if not isinstance(k, int) or isinstance(k, bool):
            raise SweepError(f"{src}: autoencoders keys are K values (integers), got {k!r}")
        p = Path(str(ae_path))
        autoencoders[k] = str(p if p.is_absolute() else (here / p).resolve())

    world_size = raw.get("world_size", 1)
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise SweepError(f"{src}: world_size must be a positive integer, got {world_size!r}")

    return SweepSpec(
        name=str(name), base=base, overrides=_overrides(raw.get("overrides"), src),
        axes=_axes(raw.get("axes"), sizes, src), sizes=sizes, autoencoders=autoencoders,
        world_size=world_size, slurm=_slurm(raw.get("slurm"), src), source=path.resolve(),
    )


def _overrides(raw: Any, src: str) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [override_text(k, v) for k, v in raw.items()]
    if isinstance(raw, list) and all(isinstance(o, str) and "=" in o for o in raw):
        return list(raw)
    raise SweepError(f"{src}: 'overrides' must be a list of section.key=value or a mapping")


def _axes(raw: Any, sizes: dict[str, list[str]], src: str) -> dict[str, list[Any]]:
    if not isinstance(raw, dict) or not raw:
        raise SweepError(f"{src}: empty grid: 'axes' must name at least one axis with values "
                         f"({', '.join(AXES)}, {OVERRIDE_PREFIX}<section.key>)")
    axes: dict[str, list[Any]] = {}
    for axis, values in raw.items():
        where = f"{src}: axis {axis!r}"
        generic = isinstance(axis, str) and axis.startswith(OVERRIDE_PREFIX)
        if axis not in AXES and not generic:
            raise SweepError(f"{where}: unknown axis; supported: {', '.join(AXES)}, {OVERRIDE_PREFIX}<section.key>")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SweepError(f"{where}: empty grid: the axis has no values")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise SweepError(f"{where}: repeated values {values}")
        if generic:
            key = axis[len(OVERRIDE_PREFIX):]
            if key.count(".") != 1:
                raise SweepError(f"{where}: expected {OVERRIDE_PREFIX}section.key, "
                                 f"e.g. override:optimizer.weight_decay")
            if key in _FIXED_KEYS:
                raise SweepError(f"{where}: {key} is fixed across a sweep (same data order and seed; "
                                 f"the sweep sets output_dir and train_steps itself)")
        elif axis == "stage":
            bad = [v for v in values if v not in STAGES]
            if bad:
                raise SweepError(f"{where}: unknown stage(s) {bad}; a sweep trains {' or '.join(STAGES)}")
        elif axis == "model":
            missing = [v for v in values if str(v) not in sizes]
            if missing:
                raise SweepError(f"{where}: size(s) {missing} not defined under 'sizes:' "
                                 f"(defined: {', '.join(sizes) or 'none'})")
            values = [str(v) for v in values]
        elif axis == "patch_size":
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                raise SweepError(f"{where}: K values must be positive integers, got {values}")
        elif axis == "tokens":
            values = [parse_tokens(v, where) for v in values]
        elif axis == "lr":
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
                raise SweepError(f"{where}: learning rates must be positive numbers, got {values}")
            values = [float(v) for v in values]
        axes[axis] = values
    return axes


def _slurm(raw: Any, src: str) -> SlurmSettings:
    if raw is None:
        return SlurmSettings()
    if not isinstance(raw, dict) or set(raw) - set(_SLURM_KEYS):
        raise SweepError(f"{src}: 'slurm' takes only {', '.join(_SLURM_KEYS)}")
    args = raw.get("sbatch_args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) and a.startswith("-") for a in args):
        raise SweepError(f"{src}: slurm.sbatch_args must be a list of sbatch options, e.g. [--partition=gpu]")
    bad = [a for a in args if a.split("=")[0] in ("--array", "-a", "--output", "-o", "--job-name", "-J")]
    if bad:
        raise SweepError(f"{src}: slurm.sbatch_args {bad}: the sweep sets --array, --output and --job-name itself")
    max_concurrent = raw.get("max_concurrent", 0)
    if not isinstance(max_concurrent, int) or max_concurrent < 0:
        raise SweepError(f"{src}: slurm.max_concurrent must be an integer >= 0")
    return SlurmSettings(sbatch_args=args, train_script=str(raw.get("train_script") or ""),
                         max_concurrent=max_concurrent)
