"""Rank-0 metrics: one console line per log interval, and the sinks (JSONL, TensorBoard, W&B).

The console line, built by the pure `format_metrics_line`:

    step 120/2000 | loss 19.84 (fid 10.01 div 0.18) | grad 0.91 | lr 1.0e-03 | 5,210 tok/s 1,302 vec/s
    | 0.8 TFLOP/s MFU 12.3% | mem 1.2 GiB | data 3 ms

Keys it knows (absent or None ones are skipped; any other key is appended as `key value`, sorted):
loss and its parts (fid, div, ce, kl, acc, sigma), grad_norm, lr, tok_per_s, vec_per_s, tflops,
mfu, memory (mem_alloc_gib, mem_reserved_gib, mem_pct, mem_rss_gib), GPU telemetry (gpu_util_pct,
gpu_mem_used_gib, gpu_power_w, gpu_temp_c), data_ms, and eval's brier1..4, brierlm, ppl.

Console output goes to stdout with print, not through `logging`: the line is the run's record and
must appear on rank 0 whatever DeepSpeed or megatron do to logger levels and handlers, diagnostics
keep going to stderr through `logging`, and with a progress bar the line must be written through
tqdm so that the bar is redrawn below it. The bar (tqdm, with ETA) is shown only in an
interactive run (`logging.progress_bar`); SLURM logs get plain lines and never a carriage return.

Only rank 0 writes anything; on other ranks every method is a no-op.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from calm_dist.common.job_log import short_hostname
from calm_dist.config.schema import LoggingConfig

# ---- the console line ------------------------------------------------------------------------------

_Fmt = Callable[[float], str]


def _g(digits: int) -> _Fmt:
    return lambda v: f"{v:.{digits}g}"


def _fixed(decimals: int) -> _Fmt:
    return lambda v: f"{v:.{decimals}f}"


def _commas(v: float) -> str:
    return f"{v:,.0f}"


# Segments of the line, in order. Each item: (key, template with {} for the value, formatter).
# A segment's `parens` items follow its main items inside one pair of parentheses.
_SEGMENTS: list[dict[str, list[tuple[str, str, _Fmt]]]] = [
    {"main": [("loss", "loss {}", _g(4))],
     "parens": [("fid", "fid {}", _g(4)), ("div", "div {}", _g(4)), ("cos", "cos {}", _fixed(3)),
                ("ce", "ce {}", _g(4)),
                ("kl", "kl {}", _g(4)), ("acc", "acc {}", _g(4)), ("sigma", "sigma {}", _g(3))]},
    {"main": [("uncond", "uncond {}", _g(4)), ("gap_pct", "gap {}%", _fixed(1))]},
    {"main": [("brier1", "brier1 {}", _g(4)), ("brier2", "brier2 {}", _g(4)),
              ("brier3", "brier3 {}", _g(4)), ("brier4", "brier4 {}", _g(4))]},
    {"main": [("brierlm", "BrierLM {}", _fixed(2))]},
    {"main": [("ppl", "ppl {}", _g(4))]},
    {"main": [("grad_norm", "grad {}", _g(3))]},
    {"main": [("lr", "lr {}", lambda v: f"{v:.1e}")]},
    {"main": [("tok_per_s", "{} tok/s", _commas), ("vec_per_s", "{} vec/s", _commas)]},
    {"main": [("tflops", "{} TFLOP/s", _g(3)), ("mfu", "MFU {}%", _fixed(1))]},
    {"main": [("mem_alloc_gib", "mem {} GiB", _fixed(1)), ("mem_rss_gib", "rss {} GiB", _fixed(1))],
     "parens": [("mem_reserved_gib", "reserved {} GiB", _fixed(1)), ("mem_pct", "{}%", _fixed(0))]},
    {"main": [("gpu_util_pct", "gpu {}%", _fixed(0)), ("gpu_mem_used_gib", "{} GiB", _fixed(1)),
              ("gpu_power_w", "{} W", _fixed(0)), ("gpu_temp_c", "{} C", _fixed(0))]},
    {"main": [("data_ms", "data {} ms", _fixed(0))]},
]
_KNOWN = {key for seg in _SEGMENTS for items in seg.values() for key, _, _ in items}


def _render(items: list[tuple[str, str, _Fmt]], metrics: Mapping[str, Any]) -> list[str]:
    return [tmpl.format(fmt(float(metrics[key]))) for key, tmpl, fmt in items if metrics.get(key) is not None]


def _other(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # a 0-dim tensor or numpy scalar
        except (TypeError, ValueError):
            return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def format_metrics_line(step: int, total: int, metrics: Mapping[str, Any]) -> str:
    """`step N/M | ...`: the keys present, in a fixed order; pure (no I/O, no clock)."""
    parts = [f"step {step}/{total}"]
    for segment in _SEGMENTS:
        main, parens = _render(segment["main"], metrics), _render(segment.get("parens", []), metrics)
        if parens:
            main.append("(" + " ".join(parens) + ")")
        if main:
            parts.append(" ".join(main))
    others = [f"{k} {_other(v)}" for k, v in sorted(metrics.items()) if k not in _KNOWN and v is not None]
    if others:
        parts.append(" ".join(others))
    return " | ".join(parts)


# ---- the logger --------------------------------------------------------------------------------------

_RESERVED = ("step", "kind", "time", "elapsed_s")


def _json_value(value: Any) -> Any:
    """Plain JSON numbers; a non-finite float becomes null (strict JSON has no NaN)."""
    if isinstance(value, bool) or isinstance(value, (int, str)) or value is None:
        return value
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return value if math.isfinite(value) else None


def is_interactive(progress_bar: str, world_size: int) -> bool:
    """Whether to show a progress bar. `auto`: stdout is a terminal, one process, and not a SLURM
    job; `on`: stdout is a terminal (an `srun --pty` session may want one); `off`: never. A bar
    needs a terminal in every case, so a log file never gets carriage returns."""
    tty = sys.stdout.isatty()
    if progress_bar == "off":
        return False
    if progress_bar == "on":
        return tty
    return tty and world_size == 1 and "SLURM_JOB_ID" not in os.environ


class MetricsLogger:
    """Writes train/eval metrics from rank 0 to the console and the enabled sinks.

    `run_dir/metrics.jsonl` (appended across resumes: a replayed step's last record wins) holds one
    object per call: step, kind (train | eval), time (Unix seconds), elapsed_s, then the metrics.
    TensorBoard goes to `run_dir/tensorboard` and W&B to project `wandb_project`; a sink whose
    package is missing or fails is announced once and skipped, never fatal."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        logging_cfg: LoggingConfig,
        rank: int,
        world_size: int,
        total_steps: int,
        start_step: int = 0,
        interactive: Optional[bool] = None,
        run_config: Optional[Mapping[str, Any]] = None,
    ):
        self.run_dir = Path(run_dir)
        self.cfg = logging_cfg
        self.rank = rank
        self.total_steps = total_steps
        self.enabled = rank == 0
        # In a job of several ranks every console line names its rank and host, as the log lines do.
        self._prefix = f"[rank{rank}@{short_hostname()}] " if world_size > 1 else ""
        self._start = time.time()
        self._jsonl = self._tensorboard = self._wandb = self._bar = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if logging_cfg.jsonl:
            path = self.run_dir / "metrics.jsonl"
            torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
            self._jsonl = open(path, "a", encoding="utf-8")
            if torn:  # a run killed mid-line: its fragment stays on a line of its own
                self._jsonl.write("\n")
        if logging_cfg.tensorboard:
            self._tensorboard = self._open_tensorboard(start_step)
        if logging_cfg.wandb:
            self._wandb = self._open_wandb(run_config)
        if interactive is None:
            interactive = is_interactive(logging_cfg.progress_bar, world_size)
        if interactive:  # after the sinks: their imports would otherwise skew the first ETA
            # lazy: ~0.1 s, for a bar only; calm-quickstart and calm-sweep import this module
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stdout,
                             dynamic_ncols=True, leave=True)

    # -- sinks ------------------------------------------------------------------------------------
    def _open_tensorboard(self, start_step: int):
        try:
            # lazy: optional; it also imports torch, which this module avoids
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.note("TensorBoard logging is on (logging.tensorboard) but the tensorboard package is "
                      "not installed: `pip install tensorboard` (pinned in requirements.txt) or set "
                      "logging.tensorboard=false. Going on without it.")
            return None
        # purge_step: on resume, drop the events a previous run wrote past the checkpoint.
        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step or None)

    def _open_wandb(self, run_config: Optional[Mapping[str, Any]]):
        try:
            import wandb  # lazy: optional, not in requirements.txt
        except ImportError:
            self.note("W&B logging is on (logging.wandb) but the wandb package is not installed: "
                      "`pip install wandb` or set logging.wandb=false. Going on without it.")
            return None
        try:  # offline clusters: WANDB_MODE=offline keeps the run local (wandb sync later)
            return wandb.init(project=self.cfg.wandb_project, name=self.run_dir.name, dir=str(self.run_dir),
                              config=dict(run_config or {}), resume="allow")
        except Exception as e:  # noqa: BLE001 - a W&B failure must never stop training
            self.note(f"W&B did not start ({type(e).__name__}: {e}); going on without it "
                      "(set WANDB_MODE=offline on machines without network access)")
            return None

    # -- public API -------------------------------------------------------------------------------
    def log_train(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._log("train", step, metrics)

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._log("eval", step, metrics)

    def progress(self, step: int) -> None:
        """Move the progress bar to `step` (cheap; for loops that log less often than they step)."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def note(self, text: str) -> None:
        """A one-off message on the console (rank 0), e.g. a sink that is unavailable."""
        if self.enabled:
            self._print(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:  # noqa: BLE001
                pass
        self._jsonl = self._tensorboard = self._wandb = self._bar = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------
    def _log(self, kind: str, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clash = [k for k in _RESERVED if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the record itself")
        now = time.time()
        values = {k: _json_value(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            record = {"step": step, "kind": kind, "time": round(now, 3), "elapsed_s": round(now - self._start, 3)}
            self._jsonl.write(json.dumps({**record, **values}) + "\n")
            self._jsonl.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(f"{kind}/{key}", value, step)
        if self._wandb is not None:
            try:
                self._wandb.log({f"{kind}/{k}": v for k, v in numbers.items()}, step=step)
            except Exception as e:  # noqa: BLE001
                self.note(f"W&B logging failed ({type(e).__name__}: {e}); going on without it")
                self._wandb = None
        if kind == "train":
            self.progress(step)
        line = format_metrics_line(step, self.total_steps, metrics)
        self._print(line if kind == "train" else f"eval  {line}")

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(self._prefix + text, flush=True)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in order; a line cut by a killed run is left out."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
