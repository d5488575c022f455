"""What every benchmark returns, the table the suite prints, and the files it writes.

A benchmark returns a `BenchResult`: its figures (each with the target it is judged against and
whether that target is met; `met=None` for figures reported for information only), a free-form
`details` dict (the raw measurements, written to JSON) and optionally PNG paths. A target that is
not met stays reported as not met, with the reason in `note`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch


@dataclass
class Figure:
    name: str  # what was measured, e.g. "batch 1, T=1: CALM / baseline tokens/s"
    value: Optional[float]  # None when it could not be measured (the note says why)
    unit: str = ""  # "x", "%", "tokens/s", "ms", "MiB", ...
    target: str = ""  # human-readable target, e.g. ">= 85% of limit 1.52x = 1.29x"; "" for information
    met: Optional[bool] = None  # True / False against the target; None: information only
    note: str = ""  # why a target is missed, or what the figure means


@dataclass
class BenchResult:
    name: str
    figures: list[Figure] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    seconds: float = 0.0
    skipped: str = ""  # the reason, when the benchmark did not run (e.g. no GPU)
    error: str = ""  # the exception, when it failed
    pngs: list[str] = field(default_factory=list)

    def add(self, *args, **kwargs) -> Figure:
        figure = Figure(*args, **kwargs)
        self.figures.append(figure)
        return figure


# ---- judging figures against targets --------------------------------------------------------------


def at_least(value: Optional[float], threshold: float) -> Optional[bool]:
    """True / False when value is a finite number, None when it could not be measured."""
    if value is None or not math.isfinite(value):
        return None
    return value >= threshold


def at_most(value: Optional[float], threshold: float) -> Optional[bool]:
    if value is None or not math.isfinite(value):
        return None
    return value <= threshold


def fraction_of_limit(result: BenchResult, name: str, measured: float, limit: float, fraction: float = 0.85,
                      note: str = "") -> Figure:
    """A measured ratio judged against `fraction` of a computed limit; the limit is printed beside it."""
    threshold = fraction * limit
    met = at_least(measured, threshold)
    return result.add(
        name, measured, "x", f">= {fraction:.0%} of limit {limit:.3g}x = {threshold:.3g}x", met,
        note or f"{measured / limit:.0%} of the limit",
    )


# ---- formatting -------------------------------------------------------------------------------------


def format_value(value: Optional[float], unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if unit == "%":
        text = f"{value:.1f}"
    elif magnitude != 0 and (magnitude >= 1e6 or magnitude < 1e-3):
        text = f"{value:.3g}"
    elif magnitude >= 100:
        text = f"{value:,.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    if not unit:
        return text
    return f"{text}{unit}" if unit in ("x", "%") else f"{text} {unit}"


def met_label(met: Optional[bool]) -> str:
    return {True: "yes", False: "NO", None: "-"}[met]


def table_rows(results: Iterable[BenchResult]) -> list[tuple[str, str, str, str, str, str]]:
    rows = []
    for r in results:
        if r.skipped:
            rows.append((r.name, "(skipped)", "", "", "-", r.skipped))
            continue
        if r.error:
            rows.append((r.name, "(failed)", "", "", "NO", r.error))
        for f in r.figures:
            rows.append((r.name, f.name, format_value(f.value, f.unit), f.target, met_label(f.met), f.note))
    return rows


HEADER = ("benchmark", "figure", "value", "target", "met", "note")


def format_table(results: Iterable[BenchResult]) -> str:
    """A plain-text table for the terminal (columns padded, the note last and unpadded)."""
    rows = [HEADER] + table_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = []
    for j, row in enumerate(rows):
        cells = [row[i].ljust(widths[i]) for i in range(len(HEADER) - 1)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths) + "  ----")
    return "\n".join(lines)


def markdown_table(results: Iterable[BenchResult]) -> str:
    """The same table in Markdown (for docs/performance.md)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def summary(results: list[BenchResult]) -> str:
    judged = [f for r in results for f in r.figures if f.met is not None]
    met = sum(1 for f in judged if f.met)
    failed = [r.name for r in results if r.error]
    skipped = [r.name for r in results if r.skipped]
    text = f"{met} of {len(judged)} targets met"
    if failed:
        text += f"; failed: {', '.join(failed)}"
    if skipped:
        text += f"; skipped: {', '.join(skipped)}"
    return text


# ---- files ------------------------------------------------------------------------------------------


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(results: list[BenchResult], out_dir: Path, options: dict) -> dict[str, Path]:
    """`results.json` (everything), `table.md` and `table.txt`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": options,
        "machine": machine(),
        "summary": summary(results),
        "benchmarks": [_jsonable(asdict(r)) for r in results],
    }
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "table.md", "text": out_dir / "table.txt"}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(results) + "\n")
    paths["text"].write_text(format_table(results) + "\n")
    return paths


def matplotlib_pyplot():
    """pyplot with the Agg backend, or None when matplotlib is not installed (no PNG then)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(result: BenchResult, out_dir: Path | None, name: str, draw) -> None:
    """`draw(path)` into `out_dir/name` and list it in `result` (nothing without an out_dir, or
    when draw returns False: no matplotlib)."""
    if out_dir is None:
        return
    png = Path(out_dir) / name
    png.parent.mkdir(parents=True, exist_ok=True)
    if draw(png):
        result.pngs.append(str(png))
