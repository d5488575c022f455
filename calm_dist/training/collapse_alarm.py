"""The collapse alarm: warns when a CALM run is not using its context (docs/learning.md).

Two signals, both logged as metrics every time (TensorBoard: train/cos, eval/uncond, eval/gap_pct):
- training: `cos`, the mean pairwise cosine of the backbone's final states over the micro-batch.
  A collapsed backbone gives every context one state (cos -> 1) and the head can only sample the
  marginal distribution;
- evaluation: the held-out energy beside `uncond`, the energy of a predictor that ignores the
  context. A run whose energy sits at or above that level has learned nothing conditional.
Early on both fire legitimately (the zero-initialised head first learns the marginal), so the
alarm speaks only when a signal persists.
"""

from __future__ import annotations

from dataclasses import dataclass

from calm_dist.ops.collapse import COLLAPSE_COSINE

# Energy less than 0.5% below the unconditional level counts as "at the level": both are
# Monte-Carlo estimates with about 0.1% noise at 16 evaluation blocks, and on text a learning
# tiny model sits only 1-3% below it (docs/learning.md).
AT_LEVEL_FRACTION = 0.005


@dataclass
class CollapseAlarm:
    """Feed it every logged training record and every evaluation; it returns a warning to print
    when a signal has persisted for `patience` records in a row, once per episode."""

    patience_logs: int = 5
    patience_evals: int = 3
    # Evaluations up to this step are not counted: while the head learns the marginal (the warm-up,
    # a head-first delay) the energy is above the level by design. The trainer passes the largest
    # module-group delay plus the warm-up.
    grace_steps: int = 0
    _high_cos: int = 0
    _at_level: int = 0

    def on_train(self, step: int, metrics: dict) -> str | None:
        cos = metrics.get("cos")
        if cos is None:
            return None
        self._high_cos = self._high_cos + 1 if cos >= COLLAPSE_COSINE else 0
        if self._high_cos == self.patience_logs:
            return (f"collapse alarm at step {step}: the backbone's final states have a mean pairwise cosine "
                    f"of {cos:.3f} (>= {COLLAPSE_COSINE}) for {self._high_cos} logged steps in a row: the "
                    "backbone gives (almost) every context the same state. Remedies: docs/learning.md "
                    "(shuffled blocks, a smaller learning rate for the trunk, head-first warm-up)")
        return None

    def on_eval(self, step: int, metrics: dict) -> str | None:
        energy, level = metrics.get("loss"), metrics.get("uncond")
        if energy is None or level is None or step <= self.grace_steps:
            return None
        self._at_level = self._at_level + 1 if energy >= level * (1 - AT_LEVEL_FRACTION) else 0
        if self._at_level == self.patience_evals:
            return (f"collapse alarm at step {step}: held-out energy {energy:.4g} is at or above the "
                    f"unconditional level {level:.4g} for {self._at_level} evaluations in a row: the model is "
                    "not using its context. See docs/learning.md")
        return None
