"""Tiny training runs for tests: `torchrun -m calm_dist.train` in a subprocess on a small corpus.

    overrides = prepared_corpus_overrides(tmp_path)          # a 512-token BPE, 30 speeches
    train(overrides, "tiny_autoencoder", tmp_path / "ae", "training.train_steps=4", nproc=2)

Each launch costs ~10 s on 2 CPU cores, mostly process start and imports: share runs between tests
through module-scoped fixtures. (The same helpers as tests/test_train.py, for other test files.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.dist_utils import REPO_ROOT, free_port

TINY = [
    "model.hidden_size=64", "model.intermediate_size=172", "model.num_layers=2", "model.num_attention_heads=4",
    "autoencoder.hidden_size=64", "autoencoder.intermediate_size=160", "data.seq_length=64",
    "training.micro_batch_size=4", "training.eval_steps=4", "optimizer.warmup_steps=2", "logging.log_interval=1",
    "logging.tensorboard=false", "data.num_workers=0",
]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}


def train_command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "calm_dist.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "calm_dist.train"]


def train(data: list[str], preset: str, out: Path, *overrides: str, nproc: int = 1, check: bool = True,
          timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Train `preset` with the TINY shape into `out`; `data` from prepared_corpus_overrides."""
    args = [*train_command(nproc), "--config", preset, *data, *TINY, f"training.output_dir={out}", *overrides]
    proc = subprocess.run(args, capture_output=True, text=True, env=env or child_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def prepared_corpus_overrides(directory: Path) -> list[str]:
    """Prepare a small corpus (512-token BPE, 30 speeches) in `directory`; the overrides that use it."""
    from calm_dist.data.prepare import prepare_bundled_corpus

    prepared = prepare_bundled_corpus(directory, vocab_size=512, count=30, shard_tokens=1 << 13)
    t = prepared.train
    return [f"data.train_path={t.directory}", f"data.valid_path={prepared.valid.directory}",
            f"data.tokenizer={prepared.tokenizer_path}", f"model.vocab_size={t.vocab_size}",
            f"model.pad_token_id={t.pad_id}", f"model.bos_token_id={t.bos_id}", f"model.eos_token_id={t.eos_id}"]
