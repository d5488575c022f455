"""The performance-compute frontier plot (CALM paper Fig. 4): points and fitted power laws per
group on log-log axes, written as a PNG with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calm_dist.sweep.fit import PowerLaw

LABELS = {"brierlm": "BrierLM", "loss": "final eval loss", "train_loss": "final train loss"}


def frontier_plot(fits: list[PowerLaw], groups: dict[str, list[tuple[float, float]]], metric: str,
                  out: Path, title: str = "") -> Path:
    import matplotlib  # lazy: ~0.3 s, for --plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg"), which must come before pyplot

    by_group = {f.group: f for f in fits}
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (group, pts) in enumerate(sorted(groups.items())):
        color = f"C{i}"
        c, v = zip(*pts)
        marker = "s" if group == "baseline" else "o"
        fit = by_group.get(group)
        label = group if fit is None else f"{group}: b = {fit.b:.3g}" + (
            f" ± {fit.se_b:.2g}" if np.isfinite(fit.se_b) else "")
        ax.scatter(c, v, color=color, marker=marker, label=label, zorder=3)
        if fit is not None:
            grid = np.geomspace(min(c), max(c), 50)
            ax.plot(grid, fit.predict(grid), color=color, linestyle="--" if group == "baseline" else "-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs, calm_dist/flops.py)")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(title or f"{LABELS.get(metric, metric)} vs compute: fits L(C) = a C^b")
    ax.grid(True, which="both", alpha=0.3)
    if groups:
        ax.legend()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
