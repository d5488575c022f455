"""Shared fixtures: real text and a small corpus-trained tokenizer (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from calm_dist.data.corpus import sotu_documents, split_documents
from calm_dist.data.tokenizer import train_bpe


def _ids(tok, docs: list[str]) -> list[int]:
    ids: list[int] = []
    for doc in docs:
        ids += [tok.bos_id] + tok.encode(doc)
    return ids


@pytest.fixture(scope="session")
def sotu_bpe_1k():
    """(tokenizer, train ids, held-out ids): a 1,024-token byte-level BPE trained on 36 recent
    State of the Union speeches; every 10th speech of the 40 is held out whole."""
    train_docs, held_docs = split_documents(sotu_documents(40))
    tok = train_bpe(train_docs, 1024)
    return tok, _ids(tok, train_docs), _ids(tok, held_docs)


# Under pytest-xdist (./test.sh runs two workers) each test module runs whole on one worker, so
# module- and session-scoped fixtures (trained models) are built once per module. The SLURM modules
# share one unit: they start the same test cluster (one slurmctld port, the /etc/hosts lines of its
# nodes), which must never run twice at once. (xdist's own `--dist loadgroup` would do this with
# markers, but under pytest 9 its group suffix never reaches the scheduler.) Listed modules go
# first, the longest first, so that no long module starts last and leaves the other worker idle;
# an entry missing here costs only time.
SHARED_UNITS = {"test_slurm": "slurm", "test_slurm_multinode": "slurm"}
LONGEST_FIRST = ("test_slurm", "test_slurm_multinode", "test_faults", "test_quickstart", "test_train",
                 "test_parallel_3d", "test_learning", "test_bench", "test_reference_interop", "test_eval_generate")


def pytest_configure(config):
    """Under xdist, each worker takes its share of the cores for torch's intra-op threads. torch's
    default is every core per process. Two workers would then spin 2x as many OpenMP threads as
    there are cores, and a single-process test runs several times slower than alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS
        torch.set_num_threads(max(1, cores // workers))


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the order inside a module stays


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnits(LoadScopeScheduling):
        """Whole modules (or shared units of them) per worker, in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SHARED_UNITS.get(Path(module).stem, module)

    config.option.loadscopereorder = False  # keep LONGEST_FIRST's order
    return ModuleUnits(config, log)
