"""Sampling: likelihood-free temperature sampling of chunks."""

from calm_dist.sampling.temperature import (
    BatchSampleResult,
    BatchWeights,
    batch_temperature_sample,
    batch_weights,
    exact_temperature_sample,
    expected_draws,
    parse_temperature,
)

__all__ = [
    "BatchSampleResult",
    "BatchWeights",
    "batch_temperature_sample",
    "batch_weights",
    "exact_temperature_sample",
    "expected_draws",
    "parse_temperature",
]
