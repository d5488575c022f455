"""Power-law fits of a metric against training compute: L(C) = a * C^b, one per group.

Groups: the token baseline, and CALM per K. The fit is ordinary least squares of log L on log C
(natural logs), so b is the slope and a = exp(intercept). The exponent's uncertainty is given two
ways: the standard error of the slope, SE(b) = sqrt(RSS / (n - 2) / sum (x - mean x)^2) (needs
n >= 3), and a 95% percentile bootstrap interval over points resampled with replacement
(resamples whose compute values are all equal are dropped). Points with a non-positive or missing
metric or compute cannot be logged and are left out, with a note.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

METRICS = {"brierlm": "brierlm", "loss": "eval_loss", "train_loss": "train_loss"}


@dataclass
class PowerLaw:
    group: str
    n: int
    a: float
    b: float
    se_b: float  # nan when n < 3
    ci_low: float  # 95% bootstrap interval of b (nan when it cannot be formed)
    ci_high: float
    r2: float
    compute: list[float]
    values: list[float]

    def predict(self, c: np.ndarray) -> np.ndarray:
        return self.a * np.power(c, self.b)

    def summary(self) -> str:
        se = f" ± {self.se_b:.3g} (SE)" if math.isfinite(self.se_b) else " (SE needs >= 3 points)"
        ci = f", 95% bootstrap [{self.ci_low:.4g}, {self.ci_high:.4g}]" if math.isfinite(self.ci_low) else ""
        return (f"{self.group:<12} n={self.n:<3} L(C) = {self.a:.4g} * C^b, b = {self.b:.4g}{se}{ci}, "
                f"R^2 = {self.r2:.3f}")


def fit_power_law(compute, values, group: str = "", bootstrap: int = 2000, seed: int = 0) -> PowerLaw:
    c = np.asarray(compute, dtype=float)
    y = np.asarray(values, dtype=float)
    if len(c) < 2 or np.ptp(np.log(c)) == 0:
        raise ValueError(f"{group or 'fit'}: need at least 2 points with different compute, got {len(c)}")
    x, ly = np.log(c), np.log(y)
    b, log_a = _ols(x, ly)
    resid = ly - (log_a + b * x)
    sxx = float(((x - x.mean()) ** 2).sum())
    n = len(x)
    se = math.sqrt(float((resid ** 2).sum()) / (n - 2) / sxx) if n > 2 else math.nan
    sst = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1 - float((resid ** 2).sum()) / sst if sst > 0 else 1.0
    lo = hi = math.nan
    if n > 2 and bootstrap:
        rng = np.random.default_rng(seed)
        slopes = []
        for _ in range(bootstrap):
            idx = rng.integers(0, n, n)
            if np.ptp(x[idx]) > 0:
                slopes.append(_ols(x[idx], ly[idx])[0])
        if len(slopes) >= 0.5 * bootstrap:
            lo, hi = (float(v) for v in np.percentile(slopes, [2.5, 97.5]))
    return PowerLaw(group, n, math.exp(log_a), float(b), se, lo, hi, r2, c.tolist(), y.tolist())


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    xm, ym = x.mean(), y.mean()
    b = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
    return b, float(ym - b * xm)


def group_of(row: dict[str, Any]) -> str:
    return "baseline" if row["stage"] == "baseline" else f"CALM K={row['K']}"


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def fit_csv(csv_path: Path, metric: str = "brierlm", include_unfinished: bool = False
            ) -> tuple[list[PowerLaw], dict[str, list[tuple[float, float]]], list[str]]:
    """(fits, points per group, notes) for the rows of a `collect` CSV."""
    column = METRICS[metric]
    groups: dict[str, list[tuple[float, float]]] = {}
    notes = []
    for row in read_rows(csv_path):
        if row.get("state") != "finished" and not include_unfinished:
            notes.append(f"left out {row['name']}: {row.get('state')} (--include-unfinished to use it)")
            continue
        value, flops = _number(row.get(column)), _number(row.get("flops"))
        if value is None or flops is None or value <= 0 or flops <= 0:
            notes.append(f"left out {row['name']}: {column}={row.get(column)!r}, flops={row.get('flops')!r} "
                         f"(a power law needs positive values)")
            continue
        groups.setdefault(group_of(row), []).append((flops, value))
    fits = []
    for group, pts in sorted(groups.items()):
        if len({c for c, _ in pts}) < 2:
            notes.append(f"no fit for {group}: fewer than 2 distinct compute values")
            continue
        fits.append(fit_power_law([c for c, _ in pts], [v for _, v in pts], group))
    return fits, groups, notes


def _number(text: Optional[str]) -> Optional[float]:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
