"""Checkpoints, RNG state and stop requests.

The distributed part runs real DeepSpeed ZeRO-3 engines in 2 processes (gloo, CPU) through two
torchrun launches of tests/workers/ckpt_worker.py (~40 s together): a run that trains, saves and
is killed in the middle of a save, then a run that resumes from what is left. The other tests run
in this process.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time

import numpy as np
import pytest
import torch

from calm_dist.checkpoint.manager import CheckpointManager, CheckpointMismatch, check_compatible
from calm_dist.training.rng import capture_rng_state, restore_rng_state
from calm_dist.training.signals import WALL_CLOCK, StopRequest
from tests.dist_utils import run_worker


def _results(out_dir) -> list[dict]:
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory):
    """Both worker phases; what each rank saw, and the directory as the crash left it."""
    root = tmp_path_factory.mktemp("ckpt")
    save_dir, train_out, resume_out = root / "save", root / "train", root / "resume"
    train_out.mkdir()
    resume_out.mkdir()
    crashed = run_worker(
        "ckpt_worker", "--phase", "train", "--save-dir", save_dir, "--out", train_out,
        tmp_path=root, timeout=180, check=False,
    )  # fmt: skip
    after_crash = {
        "returncode": crashed.returncode,
        "entries": sorted(os.listdir(save_dir)),
        "partial_files": sorted(os.listdir(save_dir / "global_step5.partial")),
        "latest": (save_dir / "latest").read_text(),
    }
    train = _results(train_out)
    run_worker(
        "ckpt_worker", "--phase", "resume", "--save-dir", save_dir, "--out", resume_out,
        tmp_path=root, timeout=180,
    )  # fmt: skip
    return {"save_dir": save_dir, "after_crash": after_crash, "train": train, "resume": _results(resume_out)}


def test_parameters_are_partitioned(ckpt_run):
    for rank in ckpt_run["train"]:
        assert rank["visible_numel"] == 0
        assert 0.45 < rank["local_numel"] / rank["total_numel"] <= 0.55


def test_resume_continues_bit_identically(ckpt_run):
    for train, resume in zip(ckpt_run["train"], ckpt_run["resume"]):
        assert resume["resolved"] == "global_step3"
        assert resume["meta_step"] == 3 and resume["meta_world_size"] == 2
        reference = {step: train["losses"][step] for step in ("4", "5")}
        assert resume["resumed_losses"] == reference  # exact float equality
        # Without the RNG streams the noise and dropout differ, so the losses do too.
        assert resume["no_rng_losses"]["4"] != reference["4"]


def test_crash_during_save_leaves_previous_checkpoint(ckpt_run):
    crash = ckpt_run["after_crash"]
    assert crash["returncode"] != 0
    assert not any("survived_crash" in rank for rank in ckpt_run["train"])
    # The killed save had written everything but was not made visible.
    assert crash["entries"][:3] == ["global_step2", "global_step3", "global_step5.partial"]
    assert {"meta.json", "rank_00000.pt", "rank_00001.pt"} <= set(crash["partial_files"])
    assert crash["latest"] == "global_step3"
    for rank in ckpt_run["resume"]:
        assert rank["partial_left"] is False  # cleaned when the next run started


def test_keep_last_prunes_and_resave_replaces(ckpt_run):
    for train, resume in zip(ckpt_run["train"], ckpt_run["resume"]):
        assert train["tags_after_3"] == ["global_step2", "global_step3"]
        assert resume["tags_after_save"] == ["global_step3", "global_step5"]
        assert resume["tags_after_resave"] == ["global_step3", "global_step5"]
        assert resume["latest"] == "global_step5"
        assert resume["leftovers"] == []


def test_load_errors_are_explicit(ckpt_run):
    for rank in ckpt_run["resume"]:
        assert "step 7" in rank["errors"]["missing_step"]
        assert "available steps: [2, 3]" in rank["errors"]["missing_step"]
        message = rank["errors"]["world_size"]
        assert "written by 2 ranks" in message and "world size 3" in message


def test_weights_only_load_reads_the_requested_checkpoint(ckpt_run):
    rank0 = ckpt_run["resume"][0]
    assert rank0["weights_only_vs_step2"] == 0.0
    assert rank0["weights_only_vs_step3"] > 0.0  # `latest` named step 3: DeepSpeed alone would load it


def test_consolidated_weights_match_live_weights(ckpt_run):
    assert ckpt_run["train"][0]["consolidated_vs_live"] == 0.0


def test_agreed_stop_reason_reaches_every_rank(ckpt_run):
    rank0, rank1 = ckpt_run["resume"]
    assert (rank0["local_reason"], rank1["local_reason"]) == (None, "SIGTERM")
    assert rank0["agreed_reason"] == rank1["agreed_reason"] == "SIGTERM"


def test_truncated_or_missing_rank_file_is_named(ckpt_run, tmp_path):
    shutil.copytree(ckpt_run["save_dir"] / "global_step5", tmp_path / "global_step5")
    rank1_file = tmp_path / "global_step5" / "rank_00001.pt"
    rank1_file.write_bytes(rank1_file.read_bytes()[:100])
    manager = CheckpointManager(tmp_path, keep_last=2, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank_00001.pt is truncated"):
        manager.load(None, "global_step5")  # fails before the engine is touched
    rank1_file.unlink()
    with pytest.raises(FileNotFoundError, match="rank_00001.pt is missing"):
        manager.load(None, "global_step5")


def test_check_compatible_names_differing_fields():
    saved = {
        "model": {"hidden_size": 64, "num_layers": 2},
        "autoencoder": {"latent_size": 16},
        "optimizer": {"lr": 1e-3},
        "parallel": {"zero_stage": 3, "tensor_parallel": 1},
        "training": {"stage": "calm", "train_steps": 10},
    }
    current = json.loads(json.dumps(saved))
    current["optimizer"]["lr"] = 5e-4  # allowed
    current["training"]["train_steps"] = 20  # allowed
    check_compatible(saved, current)

    current["model"]["hidden_size"] = 128
    current["parallel"]["zero_stage"] = 2
    with pytest.raises(CheckpointMismatch) as excinfo:
        check_compatible(saved, current)
    message = str(excinfo.value)
    assert "model.hidden_size: saved 64, current 128" in message
    assert "parallel.zero_stage: saved 3, current 2" in message
    assert "lr" not in message and "train_steps" not in message
    assert "output_dir" in message


def _draw() -> list:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracked = torch.rand(3).tolist()
    return [random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), tracked]


def test_rng_round_trip(tmp_path, caplog):
    from calm_dist.parallel.state import ensure_model_parallel

    ensure_model_parallel()  # megatron's tracker, seeded (on the CPU compatibility layer here)
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert "megatron_tracker" in state
    first = _draw()
    assert _draw() != first
    restore_rng_state(state)
    assert _draw() == first

    if not torch.cuda.is_available():
        with caplog.at_level(logging.WARNING, logger="calm_dist.training.rng"):
            restore_rng_state({**state, "torch_cuda": [torch.get_rng_state()]})
        assert "CUDA is not available" in caplog.text
        assert _draw() == first


def test_stop_request_catches_signals_and_restores_handlers():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with StopRequest() as stop:
            assert stop.reason() is None
            os.kill(os.getpid(), signal.SIGTERM)  # the process must survive this
            assert stop.reason() == "SIGTERM"
            assert stop.agreed_reason() == "SIGTERM"
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.reason() == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # back to the handler installed before
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_stop_request_wall_clock_budget():
    with StopRequest(wall_clock_minutes=10.0) as stop:
        assert stop.reason() is None
    with StopRequest(wall_clock_minutes=0.001) as stop:  # 60 ms
        time.sleep(0.1)
        assert stop.reason() == WALL_CLOCK
    # The budget counts from an earlier start when given one.
    with StopRequest(wall_clock_minutes=1.0, start_time=time.time() - 61) as stop:
        assert stop.reason() == WALL_CLOCK


def test_a_checkpoint_retired_by_an_interrupted_resave_comes_back(tmp_path):
    """A crash after the old copy of a re-saved step was retired but before its replacement was
    committed leaves the retired copy as the only complete one: the next start restores it."""
    from calm_dist.checkpoint.manager import CheckpointManager

    save_dir = tmp_path / "ckpt"
    retired = save_dir / "global_step3.retired"
    retired.mkdir(parents=True)
    (retired / "meta.json").write_text(json.dumps({"step": 3}))
    (save_dir / "global_step3.partial").mkdir()  # the replacement that never got committed
    (save_dir / "latest").write_text("global_step3")
    manager = CheckpointManager(save_dir, keep_last=3, rank=0, world_size=1)
    assert manager.tags() == ["global_step3"] and manager.resolve(-1) == "global_step3"
    assert sorted(os.listdir(save_dir)) == ["global_step3", "latest"]


def _fake_checkpoint(save_dir, step: int) -> None:
    """A checkpoint directory as the manager writes one (files, meta.json, manifest.json), without an engine."""
    import json as _json

    from calm_dist.common.atomic import atomic_write_bytes
    from calm_dist.checkpoint.integrity import write_manifest

    path = save_dir / f"global_step{step}"
    path.mkdir(parents=True)
    (path / "weights.pt").write_bytes(bytes(range(256)) * (step + 1))
    (path / "meta.json").write_text(_json.dumps({"step": step, "manifest": 1}))
    write_manifest(path, atomic_write_bytes)
    (save_dir / "latest").write_text(f"global_step{step}")


def test_verification_falls_back_sets_aside_and_never_restarts_a_run_from_nothing(tmp_path, caplog):
    """The newest checkpoint damaged: the one before is used and `latest` names it. A manifest
    that meta.json promises but that is gone is damage too. With every checkpoint set aside, a
    launch refuses instead of training again from step 0 in the same directory."""
    from calm_dist.checkpoint.integrity import CheckpointDamaged

    save_dir = tmp_path / "checkpoints"
    for step in (2, 4):
        _fake_checkpoint(save_dir, step)
    data = bytearray((save_dir / "global_step4" / "weights.pt").read_bytes())
    data[7] ^= 1
    (save_dir / "global_step4" / "weights.pt").write_bytes(bytes(data))

    manager = CheckpointManager(save_dir, keep_last=3, rank=0, world_size=1)
    with pytest.raises(CheckpointDamaged, match="weights.pt does not match its checksum.*training.load_step=N"):
        manager.resolve_verified(fallback=False)
    with caplog.at_level("ERROR"):
        assert manager.resolve_verified() == "global_step2"
    assert "CHECKPOINT DAMAGED" in caplog.text and (save_dir / "global_step4.damaged" / "weights.pt").is_file()
    assert (save_dir / "latest").read_text() == "global_step2"

    (save_dir / "global_step2" / "manifest.json").unlink()
    with pytest.raises(CheckpointDamaged, match="manifest.json is missing .*no older checkpoint"):
        manager.resolve_verified()
    with pytest.raises(CheckpointDamaged, match="holds only damaged checkpoints"):
        CheckpointManager(save_dir, keep_last=3, rank=0, world_size=1).resolve_verified()
    assert sorted(p.name for p in save_dir.iterdir()) == ["global_step2.damaged", "global_step4.damaged", "latest"]


def test_pieces_get_their_saved_state_back_and_a_missing_one_is_named():
    from calm_dist.checkpoint.stateful import Recorded, restore, states_of

    class Position:
        def __init__(self, at: int):
            self.at = at

        def state_dict(self) -> dict:
            return {"at": self.at}

        def load_state_dict(self, state: dict) -> None:
            self.at = state["at"]

    saved = states_of({"data": Position(7), "params_local": Recorded(lambda: 123)})
    assert saved == {"data": {"at": 7}, "params_local": 123}
    fresh = Position(0)
    restore({"data": fresh, "params_local": Recorded(lambda: 0)}, saved, "rank_00000.pt")
    assert fresh.at == 7
    with pytest.raises(KeyError, match=r"rank_00000.pt holds no saved state for \['rng'\]"):
        restore({"data": Position(0), "rng": Position(0)}, saved, "rank_00000.pt")
    restore({"data": Position(0), "params_total": Recorded(lambda: 0)}, saved, "rank_00000.pt")  # nothing to restore


def test_the_saved_layout_follows_from_the_config_and_older_checkpoints_read_the_same():
    from calm_dist.checkpoint.saved_layout import layout_of
    from calm_dist.config import config_to_dict, load_config, validate

    cfg = validate(load_config("tiny_calm", ["parallel.regime=3d", "parallel.tensor_parallel=2",
                                             "parallel.pipeline_parallel=2", "parallel.zero_stage=1"]), world_size=8)
    meta = {"config": config_to_dict(cfg), "world_size": 8}
    expected = {"world_size": 8, "regime": "3d", "tensor_parallel": 2, "pipeline_parallel": 2, "virtual_stages": 1,
                "data_parallel": 2, "zero_stage": 1}
    assert layout_of(meta) == expected
    # What checkpoints written before this version stored beside the config.
    stored = {k: v for k, v in expected.items() if k != "virtual_stages"}
    assert layout_of({**meta, "layout": stored}) == expected
    zero3 = validate(load_config("tiny_calm", []), world_size=2)
    assert layout_of({"config": config_to_dict(zero3), "world_size": 2})["data_parallel"] == 2
    # Some older versions stored fewer keys (no regime): the config fills them in.
    fewer = {"world_size": 2, "tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 2}
    assert layout_of({"config": config_to_dict(zero3), "world_size": 2, "layout": fewer})["regime"] == "zero3"
