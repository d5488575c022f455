"""Numerical building blocks (losses) shared by the models."""

from calm_dist.ops.energy import EnergyLoss, energy_loss, energy_score

__all__ = ["EnergyLoss", "energy_loss", "energy_score"]
