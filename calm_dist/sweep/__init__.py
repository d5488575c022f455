"""Scaling-law sweeps: plan a grid of runs from a sweep file, submit it (locally or as one SLURM job
array), follow it, collect results to CSV and fit power laws against compute (docs/sweeps.md)."""
