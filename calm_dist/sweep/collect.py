"""Gather each point's results into one CSV row: size, parameters, tokens, FLOPs, final metrics.

Parameters use the models' own formulas (`calm_param_count`: trainable, without the frozen
autoencoder, as the paper's Table 1; `baseline_param_count`). Training FLOPs are
`training_flops_per_token` (calm_dist/flops.py, CALM.md §5.3) x the tokens actually trained
(checkpoint step x tokens per step). Final metrics are the last train and eval records of the
trainer's metrics.jsonl; BrierLM is blank where no evaluation ran.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from calm_dist.training.metrics import read_metrics
from calm_dist.sweep.plan import read_plan
from calm_dist.sweep.state import checkpoint_step, sweep_states

COLUMNS = ["name", "stage", "K", "size", "hidden_size", "num_layers", "lr", "params", "train_steps", "step",
           "tokens", "flops_per_token", "flops", "train_loss", "eval_loss", "brierlm", "state"]


def last_records(metrics_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(last train record, last eval record) of a metrics.jsonl; empty dicts when absent."""
    train: dict[str, Any] = {}
    evaluation: dict[str, Any] = {}
    if metrics_file.is_file():
        for record in read_metrics(metrics_file):
            if record.get("kind") == "train" and record.get("loss") is not None:
                train = record
            elif record.get("kind") == "eval":
                evaluation = record
    return train, evaluation


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    sweep_dir = Path(sweep_dir)
    _, points = read_plan(sweep_dir)
    rows = []
    for p, (state, _, _) in zip(points, sweep_states(sweep_dir, points)):
        point_dir = sweep_dir / p["name"]
        train, evaluation = last_records(point_dir / "metrics.jsonl")
        step = checkpoint_step(point_dir)
        tokens = step * p["tokens_per_step"]
        rows.append({
            "name": p["name"], "stage": p["stage"], "K": p["K"] if p["K"] is not None else "",
            "size": p["size"] or "", "hidden_size": p["hidden_size"], "num_layers": p["num_layers"],
            "lr": p["lr"], "params": p["params"], "train_steps": p["train_steps"], "step": step,
            "tokens": tokens, "flops_per_token": f"{p['flops_per_token']:.6g}",
            "flops": f"{p['flops_per_token'] * tokens:.6g}", "train_loss": train.get("loss", ""),
            "eval_loss": evaluation.get("loss", ""), "brierlm": evaluation.get("brierlm", ""), "state": state,
        })
    return rows


def write_csv(rows: list[dict[str, Any]], out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return out
