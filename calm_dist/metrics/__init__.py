"""Evaluation metrics (BrierLM)."""

from calm_dist.metrics.brier import (
    BrierAccumulator,
    all_starts,
    baseline_brier_terms,
    brierlm_from_means,
    calm_brier_terms,
    chunk_aligned_starts,
)

__all__ = [
    "BrierAccumulator",
    "all_starts",
    "baseline_brier_terms",
    "brierlm_from_means",
    "calm_brier_terms",
    "chunk_aligned_starts",
]
