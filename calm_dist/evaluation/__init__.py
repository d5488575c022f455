"""Evaluation: one block scorer (`scorer.py`) behind the trainer's periodic evaluation
(`in_training.py`), `calm-eval` (`cli.py`) and the quickstart's summary, so the three give the same
BrierLM on the same checkpoint and blocks. The estimators themselves live in `calm_dist.ops.brier`."""
