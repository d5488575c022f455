"""The 3d regime (megatron-core TP and PP, ZeRO-1 over DP) against one process, on CPU with gloo.

Each multi-process run trains a few steps with 4 ranks from the same seed weights and the same
batches as a single-process reference computed here. The reference draws each data-parallel
replica's noise (energy-head samples, target samples) from that replica's generator, seeded as the
3d ranks seed theirs, so the two compute the same maths: losses, gradients and weights must agree
to float tolerance (TP and PP only change the order of float sums).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from calm_dist.checkpoint.reshard import LayoutChangeError, SavedLayout, continued_rank_state, read_merged, source_rank
from calm_dist.checkpoint.saved_layout import layout_of
from calm_dist.config import load_config, validate
from calm_dist.models.autoencoder import Autoencoder
from calm_dist.models.autoencoder_io import save_autoencoder
from calm_dist.parallel.sharding import merge_state_dicts, shard_state_dict
from calm_dist.parallel.state import ParallelLayout, ensure_model_parallel, seed_all, training_seed
from tests.dist_utils import WORKERS, run_distributed

SHAPE = [
    "model.hidden_size=64", "model.intermediate_size=172", "model.num_layers=4", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.vocab_size=97", "model.pad_token_id=96", "model.bos_token_id=0",
    "model.eos_token_id=0", "autoencoder.hidden_size=32", "autoencoder.intermediate_size=80",
    "data.seq_length=32", "model.num_target_samples=16", "model.attention_backend=sdpa",
    "optimizer.warmup_steps=0", "optimizer.lr=3e-3", "optimizer.grad_clip=0.5", "training.seed=7",
]  # fmt: skip
STEPS = 3


def _config(preset: str, overrides: list[str], world_size: int = 1):
    return validate(load_config(preset, overrides), world_size=world_size)


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    """A random frozen autoencoder and, per stage, seed weights of the single-process model."""
    from safetensors.torch import save_file

    from calm_dist.engines.model_build import build_model

    root = tmp_path_factory.mktemp("seed")
    ensure_model_parallel()
    ae_cfg = _config("tiny_calm", SHAPE).autoencoder
    torch.manual_seed(0)
    save_autoencoder(Autoencoder(ae_cfg).state_dict(), ae_cfg, root / "autoencoder")
    files = {}
    for preset in ("tiny_calm", "tiny_baseline"):
        torch.manual_seed(1)
        model = build_model(_config(preset, SHAPE + [f"training.autoencoder_path={root / 'autoencoder'}"]))
        weights = {k: v.contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        files[preset] = root / f"{preset}.safetensors"
        save_file(weights, str(files[preset]))
    return root, files


def _reference(preset: str, overrides: list[str], tokens, dp: int, pp: int):
    """Single process: the same steps, replica by replica, each with its own noise stream."""
    from calm_dist.optim import param_groups
    from calm_dist.engines.optimizer import lr_scheduler
    from calm_dist.engines.initial_weights import load_initial_weights
    from calm_dist.engines.model_build import build_model

    ensure_model_parallel()
    cfg = _config(preset, overrides)
    model = build_model(cfg)
    load_initial_weights(model, cfg.training.init_weights)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optimizer.lr,
                                  betas=(cfg.optimizer.beta1, cfg.optimizer.beta2), eps=cfg.optimizer.eps)
    scheduler = lr_scheduler(optimizer, cfg)
    streams = []
    for replica in range(dp):  # where each replica's last stage starts drawing
        seed_all(training_seed(cfg.training.seed, ParallelLayout(pipeline_parallel=pp, pp_rank=pp - 1, dp_rank=replica)))
        streams.append(torch.get_rng_state())
    losses, first_grads, norms = [], None, []
    for step in range(tokens.shape[0]):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for replica in range(dp):
            torch.set_rng_state(streams[replica])
            for micro in tokens[step, replica]:
                loss = model(micro).loss
                (loss / (dp * tokens.shape[2])).backward()
                step_loss += loss.item() / (dp * tokens.shape[2])
            streams[replica] = torch.get_rng_state()
        losses.append(step_loss)
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)))
        if step == 0:  # clipped, as the ranks report theirs
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        scheduler.step()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return losses, first_grads, norms, weights


def _run(tmp_path: Path, seed_files, preset: str, tp: int, pp: int, dp: int, accum: int, extra: list[str],
         reload: bool = False):
    root, files = seed_files
    overrides = SHAPE + [
        f"training.autoencoder_path={root / 'autoencoder'}", f"training.init_weights={files[preset]}",
        "parallel.regime=3d", f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
        "training.micro_batch_size=2", f"training.gradient_accumulation_steps={accum}", *extra,
    ]  # fmt: skip
    cfg = _config(preset, overrides, world_size=tp * pp * dp)
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(1, cfg.model.vocab_size - 1, (STEPS, dp, accum, 2, cfg.derived.block_tokens), generator=generator)
    torch.save(tokens, tmp_path / "tokens.pt")
    spec = {"preset": preset, "overrides": overrides, "tokens": str(tmp_path / "tokens.pt"), "out": str(tmp_path),
            "reload": reload}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_distributed(WORKERS / "parallel3d_worker.py", str(tmp_path / "spec.json"), nproc=tp * pp * dp,
                    tmp_path=tmp_path, timeout=240)
    ranks = [torch.load(tmp_path / f"rank_{r}.pt", weights_only=True) for r in range(tp * pp * dp)]
    single = [o for o in overrides if not o.startswith("parallel.")]
    return cfg, ranks, _reference(preset, single, tokens, dp, pp)


def _merged_grads(ranks, num_layers: int, dp_rank: int = 0):
    shards = {(r["layout"]["tp_rank"], r["layout"]["pp_rank"], int(chunk[5:])): grads for r in ranks
              if r["layout"]["dp_rank"] == dp_rank for chunk, grads in r["grads"].items()}
    return merge_state_dicts(shards, num_layers)


def _assert_matches(cfg, ranks, reference, out: Path):
    ref_losses, ref_grads, ref_norms, ref_weights = reference
    for rank in ranks:  # every rank reports the replica-mean loss of each step
        losses = [report["loss"] for report in rank["reports"]]
        assert losses == pytest.approx(ref_losses, rel=2e-5, abs=1e-6), (rank["layout"], losses, ref_losses)
        assert rank["grad_norm"] == pytest.approx(ref_norms[-1], rel=1e-4)
    for dp_rank in {r["layout"]["dp_rank"] for r in ranks}:  # replicas agree after the all-reduce
        grads = _merged_grads(ranks, cfg.model.num_layers, dp_rank)
        assert set(grads) == set(ref_grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    # The converter merges the TP/PP checkpoint into the single-process model's weights.
    from calm_dist.checkpoint.reading import merged_model_parallel_weights, resolve_checkpoint

    # After 3 AdamW steps (lr 3e-3) an element whose gradient is ~0 turns float noise into up to a
    # step's worth of difference: atol is 3% of one step; a misplaced shard is off by ~0.02.
    merged = merged_model_parallel_weights(resolve_checkpoint(out / "checkpoints"))
    assert set(merged) == set(ref_weights)
    for name, weight in merged.items():
        torch.testing.assert_close(weight, ref_weights[name], rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_tp2_pp2_calm_matches_one_process_and_converts(tmp_path, seed_files):
    """TP=2 x PP=2, 2 micro-batches per step through the 1F1B schedule, full recomputation."""
    cfg, ranks, reference = _run(tmp_path, seed_files, "tiny_calm", tp=2, pp=2, dp=1, accum=2,
                                 extra=["parallel.zero_stage=0", "parallel.activation_recompute=full"])
    _assert_matches(cfg, ranks, reference, tmp_path)


def test_pp2_with_two_virtual_stages_calm_matches_one_process(tmp_path, seed_files):
    """PP=2 x 2 virtual stages (interleaved 1F1B: rank 0 holds layers 0 and 2, rank 1 layers 1 and
    3), 2 processes, 2 micro-batches per step; per-module optimizer settings on the chunks'
    parameter groups (the reference takes them too)."""
    cfg, ranks, reference = _run(tmp_path, seed_files, "tiny_calm", tp=1, pp=2, dp=1, accum=2,
                                 extra=["parallel.zero_stage=0", "parallel.virtual_pipeline_stages=2",
                                        "optimizer.lr_multipliers={backbone: 0.5, head: 2}",
                                        "optimizer.lr_delay_steps.embeddings=1"])
    _assert_matches(cfg, ranks, reference, tmp_path)
    assert {r["layout"]["pp_rank"]: sorted(r["grads"]) for r in ranks} == {0: ["chunk0", "chunk1"],
                                                                          1: ["chunk0", "chunk1"]}


def test_tp2_dp2_calm_matches_one_process_and_draws_noise_per_replica(tmp_path, seed_files):
    """TP=2 x DP=2 with ZeRO-1 and selective recomputation; the energy head's noise is the same on
    the tensor ranks of a replica and differs between replicas."""
    cfg, ranks, reference = _run(tmp_path, seed_files, "tiny_calm", tp=2, pp=1, dp=2, accum=1,
                                 extra=["parallel.zero_stage=1", "parallel.activation_recompute=selective"],
                                 reload=True)
    _assert_matches(cfg, ranks, reference, tmp_path)
    # ZeRO-1: each replica's optimizer file holds the moments of its share of the parameters, by
    # name; merged over replicas and tensor ranks they are every trainable parameter's, once.
    checkpoint = tmp_path / "checkpoints" / "global_step3"
    parts = [set(torch.load(checkpoint / f"optim_tp00_pp000_dp{dp:03d}.pt", weights_only=True)["moments"]["chunk0"]
                 ["exp_avg"]) for dp in (0, 1)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    merged = read_merged(checkpoint, SavedLayout.read(checkpoint), with_optimizer=True)
    assert set(merged.moments["exp_avg"]) == set(reference[1])
    # and a fresh engine on each rank loads them back (the same layout: each rank its own file)
    reloads = [torch.load(tmp_path / f"reload_{rank}.pt", weights_only=True) for rank in range(4)]
    assert all(r["weights"] and r["moments"] and 0 < r["with_state"] < r["params"] for r in reloads), reloads
    noise = {(r["layout"]["dp_rank"], r["layout"]["tp_rank"]): r["noise"] for r in ranks}
    assert torch.equal(noise[(0, 0)], noise[(0, 1)]) and torch.equal(noise[(1, 0)], noise[(1, 1)])
    assert not torch.allclose(noise[(0, 0)], noise[(1, 0)])
    assert noise[(0, 0)].abs().max() <= 0.5 and noise[(0, 0)].std() > 0.2  # U[-0.5, 0.5], not constant
    # Dropout streams: outside split layers like the noise; inside them (tracker) every rank its own.
    default = {(r["layout"]["dp_rank"], r["layout"]["tp_rank"]): r["default_draw"] for r in ranks}
    tracker = [r["tracker_draw"] for r in ranks]
    assert torch.equal(default[(0, 0)], default[(0, 1)]) and not torch.equal(default[(0, 0)], default[(1, 0)])
    assert all(not torch.equal(a, b) for i, a in enumerate(tracker) for b in tracker[i + 1:])


def test_tp2_pp2_baseline_with_a_vocabulary_parallel_output_matches_one_process(tmp_path, seed_files):
    """The token baseline through TP=2 x PP=2: its input embedding and output layer split by
    vocabulary over the tensor ranks, unevenly (97 = 49 + 48 rows), with the vocabulary-parallel
    cross-entropy."""
    cfg, ranks, reference = _run(tmp_path, seed_files, "tiny_baseline", tp=2, pp=2, dp=1, accum=2,
                                 extra=["parallel.zero_stage=0"])
    for table, stage in (("lm_head.weight", 1), ("embed_tokens.weight", 0)):
        shapes = {(r["layout"]["tp_rank"], r["layout"]["pp_rank"]): tuple(r["grads"]["chunk0"][table].shape)
                  for r in ranks if table in r["grads"]["chunk0"]}
        assert shapes == {(0, stage): (49, 64), (1, stage): (48, 64)}, table
    _assert_matches(cfg, ranks, reference, tmp_path)


def test_shard_and_merge_are_inverse_for_every_layout(seed_files):
    """Cutting a state dict for TP in {1, 2, 4} x PP in {1, 2} x virtual stages in {1, 2} and
    merging gives it back; chunks hold megatron's interleaved layers; the TP shards of a SwiGLU
    fc1 hold [gate rows; up rows] of their rank."""
    from safetensors.torch import load_file

    from calm_dist.parallel.sharding import layer_offset

    full = load_file(str(seed_files[1]["tiny_calm"]))
    layers = 4
    assert [layer_offset(layers, 2, p, 2, v) for v in (0, 1) for p in (0, 1)] == [0, 1, 2, 3]
    for tp in (1, 2, 4):
        for pp in (1, 2):
            for vpp in (1, 2):
                per = layers // (pp * vpp)
                shards = {}
                for t in range(tp):
                    for p in range(pp):
                        for v in range(vpp):
                            offset = layer_offset(layers, pp, p, vpp, v)
                            local = [k for k in full if not k.startswith("backbone.decoder.layers.")]
                            local += [f"backbone.decoder.layers.{i}.{rest}" for i in range(per)
                                      for rest in {k.split(".", 4)[4] for k in full if k.startswith("backbone.decoder.layers.")}]
                            shards[(t, p, v)] = shard_state_dict(full, local, offset, t, tp)
                merged = merge_state_dicts(shards, layers)
                assert set(merged) == set(full)
                assert all(torch.equal(merged[k], full[k]) for k in full)
    fc1 = full["backbone.decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = fc1.chunk(2)
    shard = shard_state_dict(full, ["backbone.decoder.layers.0.mlp.linear_fc1.weight"], 0, 1, 2)
    assert torch.equal(shard["backbone.decoder.layers.0.mlp.linear_fc1.weight"],
                       torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """`calm-train` in the 3d regime, 4 steps at TP=2 x PP=2 (4 ranks, 2 micro-batches per step),
    a checkpoint after every step (kept): the uninterrupted reference of the resume tests."""
    from tests.train_utils import TINY, prepared_corpus_overrides, train

    root = tmp_path_factory.mktemp("trainer3d")
    data = prepared_corpus_overrides(root / "data")
    ae_cfg = _config("tiny_calm", data + TINY).autoencoder
    torch.manual_seed(0)
    save_autoencoder(Autoencoder(ae_cfg).state_dict(), ae_cfg, root / "autoencoder")
    common = [f"training.autoencoder_path={root / 'autoencoder'}", "parallel.regime=3d",
              "parallel.pipeline_parallel=2", "parallel.zero_stage=1", "training.gradient_accumulation_steps=2",
              "training.save_interval=2", "training.eval_interval=2", "optimizer.warmup_steps=0"]  # fmt: skip
    straight = root / "straight"
    train(data, "tiny_calm", straight, "training.train_steps=4", *common, "parallel.tensor_parallel=2",
          "training.save_interval=1", "training.keep_last=4", nproc=4)
    return {"data": data, "common": common, "straight": straight}


def test_trainer_resumes_a_tp2_pp2_run_exactly(tmp_path, trainer_run):
    """`calm-train` in the 3d regime (4 ranks, TP=2 x PP=2, 2 micro-batches per step): stopping
    after 2 steps and resuming (past a damaged newest checkpoint, set aside) gives the uninterrupted
    run's losses bit for bit; held-out losses are logged; calm-convert merges its checkpoint and
    verifies the result."""
    from calm_dist.training.golden import run_losses
    from tests.train_utils import train

    data, straight, split = trainer_run["data"], trainer_run["straight"], tmp_path / "split"
    common = [*trainer_run["common"], "parallel.tensor_parallel=2"]
    train(data, "tiny_calm", split, "training.train_steps=2", *common, "training.save_interval=1", nproc=4)
    # Integrity in the 3d regime: the manifest covers every shard; a damaged one in the newest
    # checkpoint is set aside and the run resumes from the one before, with the same losses.
    manifest = json.loads((split / "checkpoints" / "global_step2" / "manifest.json").read_text())
    assert {f"mp_rank_{t:02d}_{p:03d}_model_states.pt" for t in (0, 1) for p in (0, 1)} <= set(manifest["files"])
    damaged = split / "checkpoints" / "global_step2" / "mp_rank_01_001_model_states.pt"
    data_bytes = bytearray(damaged.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data_bytes))
    proc = train(data, "tiny_calm", split, "training.train_steps=4", *common, nproc=4)
    assert "CHECKPOINT DAMAGED" in proc.stderr and damaged.name in proc.stderr
    assert "resumed from global_step1 at step 1" in proc.stderr
    assert (split / "checkpoints" / "global_step2.damaged" / damaged.name).is_file()
    reference, resumed = run_losses(straight), run_losses(split)  # the last record of each step
    assert sorted(resumed) == [1, 2, 3, 4]
    assert all(resumed[s] == reference[s] for s in (1, 2, 3, 4)), (resumed, reference)

    meta = json.loads((straight / "checkpoints" / "global_step4" / "meta.json").read_text())
    assert layout_of(meta)["regime"] == "3d" and layout_of(meta)["tensor_parallel"] == 2
    assert "layout" not in meta  # derived from the config, not stored twice
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(0 < r["loss"] < 1e3 for r in evals)
    # CALM's unconditional level beside its energy (the collapse alarm), as in the zero3 regime
    assert all(r["uncond"] > 0 and r["gap_pct"] == pytest.approx(100 * (1 - r["loss"] / r["uncond"])) for r in evals)

    # calm-convert merges the shards and verifies the converted model against the checkpoint's
    import subprocess
    import sys

    from tests.train_utils import child_env

    converted = tmp_path / "converted"
    proc = subprocess.run([sys.executable, "-m", "calm_dist.convert", "convert", str(straight), str(converted)],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified" in proc.stderr and (converted / "model.safetensors").is_file()


# Resuming under another tensor layout changes only the order of float sums (no noise stream: the
# last stage continues its own, and the data order is the same with DP = 1).
RESHARD_LOSS_RTOL = 2e-5


def _new_run_from(checkpoint: Path, run_dir: Path) -> None:
    """A run directory whose only checkpoint is a copy of `checkpoint` (a global_stepN)."""
    shutil.copytree(checkpoint, run_dir / "checkpoints" / checkpoint.name)
    (run_dir / "checkpoints" / "latest").write_text(checkpoint.name)


def _assert_uninterrupted_losses(resumed: Path, reference: Path, steps: list[int]) -> float:
    """The resumed run's losses are the uninterrupted run's; returns the largest difference."""
    from calm_dist.training.golden import run_losses

    ours, expected = run_losses(resumed), run_losses(reference)
    assert sorted(ours) == steps
    for step in steps:
        assert ours[step] == pytest.approx(expected[step], rel=RESHARD_LOSS_RTOL), (step, ours, expected)
    return max(abs(ours[step] - expected[step]) for step in steps)


@pytest.fixture(scope="module")
def resumed_at_tp1(trainer_run):
    """The TP=2 x PP=2 run's step-1 checkpoint resumed at TP=1 x PP=2 (2 ranks) to step 4."""
    from tests.train_utils import train

    run_dir = trainer_run["straight"].parent / "resumed_tp1"
    _new_run_from(trainer_run["straight"] / "checkpoints" / "global_step1", run_dir)
    proc = train(trainer_run["data"], "tiny_calm", run_dir, "training.train_steps=4", *trainer_run["common"],
                 "parallel.tensor_parallel=1", nproc=2)
    return run_dir, proc


def test_a_tp2_pp2_checkpoint_resumes_at_tp1_pp2_with_the_uninterrupted_losses(trainer_run, resumed_at_tp1):
    run_dir, proc = resumed_at_tp1
    assert "written with TP=2 x PP=2 x DP=1, for TP=1 x PP=2 x DP=1" in proc.stderr
    assert "resumed from global_step1 at step 1" in proc.stderr
    difference = _assert_uninterrupted_losses(run_dir, trainer_run["straight"], [2, 3, 4])
    print(f"TP2xPP2 -> TP1xPP2: largest loss difference {difference:.3g}")


def test_a_tp1_pp2_checkpoint_resumes_at_tp2_pp2_with_the_uninterrupted_losses(tmp_path, trainer_run, resumed_at_tp1):
    from tests.train_utils import train

    checkpoint = resumed_at_tp1[0] / "checkpoints" / "global_step2"
    assert layout_of(json.loads((checkpoint / "meta.json").read_text()))["tensor_parallel"] == 1
    _new_run_from(checkpoint, tmp_path / "resumed_tp2")
    proc = train(trainer_run["data"], "tiny_calm", tmp_path / "resumed_tp2", "training.train_steps=4",
                 *trainer_run["common"], "parallel.tensor_parallel=2", nproc=4)
    assert "written with TP=1 x PP=2 x DP=1, for TP=2 x PP=2 x DP=1" in proc.stderr
    difference = _assert_uninterrupted_losses(tmp_path / "resumed_tp2", trainer_run["straight"], [3, 4])
    print(f"TP1xPP2 -> TP2xPP2: largest loss difference {difference:.3g}")


def test_a_tp2_pp2_checkpoint_loads_into_one_process_and_names_a_missing_optimizer_file(tmp_path, trainer_run):
    """TP=2 x PP=2 -> TP=1 x PP=1, in this process: the weights are the converter's merge bit for
    bit, AdamW's moments and step and the LR schedule (matched by group name) load, the rank file
    is the saved last stage's; without one optimizer file the error names it."""
    from calm_dist.checkpoint.manager import CheckpointManager
    from calm_dist.checkpoint.reading import merged_model_parallel_weights, resolve_checkpoint
    from calm_dist.config import config_from_dict
    from calm_dist.parallel.state import current_layout, seed_model_building
    from calm_dist.engines.megatron_3d import build_3d_engine

    checkpoint = tmp_path / "global_step2"
    shutil.copytree(trainer_run["straight"] / "checkpoints" / "global_step2", checkpoint)
    config = json.loads((checkpoint / "meta.json").read_text())["config"]
    config.pop("derived")
    config["parallel"].update(tensor_parallel=1, pipeline_parallel=1)
    cfg = validate(config_from_dict(config), world_size=1)
    ensure_model_parallel()
    seed_model_building(cfg.training.seed, current_layout())
    engine = build_3d_engine(cfg, current_layout(), torch.device("cpu"))
    manager = CheckpointManager(tmp_path, keep_last=0, rank=0, world_size=1)
    _, rank_state = manager.load(engine, checkpoint.name)

    weights = engine.module.state_dict()
    merged = merged_model_parallel_weights(resolve_checkpoint(checkpoint))
    assert all(torch.equal(weights[name], tensor) for name, tensor in merged.items())
    saved = read_merged(checkpoint, SavedLayout.read(checkpoint), with_optimizer=True)
    params = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}
    assert set(saved.moments["exp_avg"]) == set(params)
    for kind in ("exp_avg", "exp_avg_sq"):
        assert all(torch.equal(engine.optimizer.state[params[name]][kind], value)
                   for name, value in saved.moments[kind].items())
    assert {float(engine.optimizer.state[p]["step"]) for p in params.values()} == {2.0}
    assert engine.get_lr() == [saved.lr_groups[group["name"]][1] for group in engine.optimizer.param_groups]
    last_stage, first_stage = (torch.load(checkpoint / f"rank_{r:05d}.pt", weights_only=True) for r in (2, 0))
    assert torch.equal(rank_state["rng"]["torch_cpu"], last_stage["rng"]["torch_cpu"])
    assert not torch.equal(rank_state["rng"]["torch_cpu"], first_stage["rng"]["torch_cpu"])

    # an optimizer file of torch's index-keyed format (before named moments) cannot be resharded
    legacy = checkpoint / "optim_tp01_pp001_dp000.pt"
    state = torch.load(legacy, weights_only=True)
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": state["lr_scheduler"],
                "client_state": state["client_state"]}, legacy)
    with pytest.raises(LayoutChangeError, match="optim_tp01_pp001_dp000.pt holds torch's index-keyed"):
        manager.load(engine, checkpoint.name)
    legacy.unlink()
    with pytest.raises(FileNotFoundError, match=r"global_step2 lacks optim_tp01_pp001_dp000\.pt: resuming"):
        manager.load(engine, checkpoint.name)


def test_resume_may_change_tensor_and_pipeline_parallelism_within_the_3d_regime_only():
    from calm_dist.checkpoint.manager import CheckpointMismatch, check_compatible
    from calm_dist.config import config_to_dict

    def config(world_size: int, *overrides: str) -> dict:
        return config_to_dict(_config("tiny_calm", SHAPE + ["parallel.zero_stage=1", *overrides], world_size))

    tp2_pp2 = config(4, "parallel.regime=3d", "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2")
    check_compatible(tp2_pp2, config(2, "parallel.regime=3d", "parallel.pipeline_parallel=2"))
    check_compatible(tp2_pp2, config(1, "parallel.regime=3d", "parallel.virtual_pipeline_stages=1"))
    with pytest.raises(CheckpointMismatch, match=r"data_parallel_size: saved 1, current 2 .*pipeline_parallel x 1\)"):
        check_compatible(tp2_pp2, config(8, "parallel.regime=3d", "parallel.tensor_parallel=2",
                                         "parallel.pipeline_parallel=2"))
    with pytest.raises(CheckpointMismatch, match="parallel.regime: saved '3d', current 'zero3'") as refused:
        check_compatible(tp2_pp2, config(4, "parallel.zero_stage=3"))
    assert "parallel.tensor_parallel: saved 2, current 1" in str(refused.value)


def test_each_rank_continues_the_data_position_and_rng_of_the_saved_rank_in_its_place():
    saved = SavedLayout(tensor_parallel=2, pipeline_parallel=2, virtual_stages=1, data_parallel=2, zero_stage=1,
                        num_layers=4)

    def place(tp: int, pp: int, tp_rank: int, pp_rank: int, dp_rank: int) -> int:
        layout = ParallelLayout(tensor_parallel=tp, pipeline_parallel=pp, data_parallel=2, tp_rank=tp_rank,
                                pp_rank=pp_rank, dp_rank=dp_rank)
        return source_rank(saved, layout)

    # the same layout: every rank its own file (megatron's order: TP fastest, then DP, then PP)
    assert [place(2, 2, r % 2, r // 4, r // 2 % 2) for r in range(8)] == list(range(8))
    # TP 2 -> 1: tensor rank 0 of the same stage and replica; PP 2 -> 1: the last stage
    assert [place(1, 2, 0, pp, dp) for pp in (0, 1) for dp in (0, 1)] == [0, 2, 4, 6]
    assert [place(2, 1, tp, 0, 1) for tp in (0, 1)] == [6, 7]
    with pytest.raises(LayoutChangeError, match="world size = tensor_parallel x pipeline_parallel x 2"):
        source_rank(saved, ParallelLayout(tensor_parallel=2, pipeline_parallel=2, data_parallel=1))
    # TP 1 -> 2: tensor rank 1 reads tensor rank 0's file but keeps its own megatron tracker streams
    tp1 = SavedLayout(tensor_parallel=1, pipeline_parallel=1, virtual_stages=1, data_parallel=1, zero_stage=1,
                      num_layers=4)
    state = {"data": {}, "rng": {"torch_cpu": torch.zeros(2), "megatron_tracker": {"model-parallel-rng": 1}}}
    kept = [continued_rank_state(state, tp1, ParallelLayout(tensor_parallel=2, tp_rank=tp)) for tp in (0, 1)]
    assert "megatron_tracker" in kept[0]["rng"] and set(kept[1]["rng"]) == {"torch_cpu"}


@pytest.mark.parametrize("overrides, message", [
    (["parallel.regime=zero3", "parallel.tensor_parallel=2"], "use parallel.regime=3d"),
    (["parallel.regime=3d", "parallel.pipeline_parallel=2", "parallel.zero_stage=3"], "ZeRO-2/3"),
    (["parallel.regime=3d", "parallel.tensor_parallel=2", "parallel.zero_stage=1",
      "parallel.sequence_parallel=true"], "model.attention_backend=te"),
    (["parallel.regime=3d", "parallel.zero_stage=1", "parallel.sequence_parallel=true"], "tensor_parallel > 1"),
    (["parallel.regime=3d", "parallel.zero_stage=1", "training.stage=autoencoder"], "no backbone to split"),
    (["parallel.regime=3d", "parallel.zero_stage=1", "parallel.ds_preset=zero3_bf16"], "leave it empty"),
    (["parallel.regime=3d", "parallel.pipeline_parallel=3", "parallel.zero_stage=1"], "must divide model.num_layers"),
    (["parallel.virtual_pipeline_stages=2"], "needs parallel.regime=3d"),
    (["parallel.regime=3d", "parallel.zero_stage=1", "parallel.pipeline_parallel=2",
      "parallel.virtual_pipeline_stages=4"], "must divide by parallel.pipeline_parallel x"),
    (["parallel.regime=3d", "parallel.zero_stage=1", "parallel.pipeline_parallel=2",
      "parallel.virtual_pipeline_stages=2", "training.gradient_accumulation_steps=3"], "must be a multiple of it"),
])  # fmt: skip
def test_validation_accepts_only_supported_layouts(overrides, message):
    from calm_dist.config.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        _config("tiny_calm", SHAPE + overrides, world_size=12)
    # and the supported 3d layouts validate, with the data-parallel size derived
    cfg = _config("tiny_calm", SHAPE + ["parallel.regime=3d", "parallel.tensor_parallel=2",
                                        "parallel.pipeline_parallel=2", "parallel.zero_stage=1"], world_size=8)
    assert cfg.derived.data_parallel_size == 2


def _saved_bytes(module: torch.nn.Module, run) -> int:
    """Bytes of the tensors autograd keeps for backward while `run()` executes (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept: dict = {}

    def pack(tensor):
        storage = tensor.untyped_storage().data_ptr()
        if storage not in weights:
            kept[(storage, tensor.storage_offset(), tensor.numel())] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(kept.values())


def test_memory_estimate_uses_the_activations_our_layers_keep():
    """The coefficients of calm_dist.parallel.memory, re-measured on a 1-layer backbone (the paper's
    FFN ratio) and energy heads of 1 and 2 blocks; and the arithmetic for a worked example."""
    from calm_dist.models.backbone import Backbone
    from calm_dist.models.energy_head import EnergyHead
    from calm_dist.parallel import memory

    ensure_model_parallel()
    steps, hidden, samples = 96, 256, 8
    cfg = _config("tiny_calm", ["model.hidden_size=256", "model.intermediate_size=688", "model.num_layers=1",
                                "model.attention_backend=sdpa"])
    backbone = Backbone(cfg.model).train()
    x = torch.randn(1, steps, hidden, requires_grad=True)
    per_layer = _saved_bytes(backbone, lambda: backbone(x)) / (steps * hidden)
    assert per_layer == pytest.approx(memory.LAYER_BYTES, rel=0.1)
    h = torch.randn(steps, hidden, requires_grad=True)
    heads = [EnergyHead(hidden, 128, 64, blocks, 0.02) for blocks in (1, 2)]
    one, two = (_saved_bytes(head, lambda head=head: head.sample(h, samples)) / (samples * steps * hidden)
                for head in heads)
    assert two - one == pytest.approx(memory.HEAD_BLOCK_BYTES, rel=0.1)
    assert 2 * one - two == pytest.approx(memory.HEAD_INPUT_BYTES, rel=0.1)

    # CALM-XL on 8 ranks, TP = 2: 1,033M parameters per GPU (half the embedding and backbone, the
    # replicated compressor and head) at 4 + 4 bytes plus Adam's 8 over 4 replicas
    xl = validate(load_config("calm_xl", ["parallel.regime=3d", "parallel.tensor_parallel=2",
                                          "parallel.zero_stage=1"]), world_size=8)
    est = memory.estimate_memory(xl)
    assert est.params_per_gpu / 1e6 == pytest.approx(1033, abs=1)
    assert est.states_gb == pytest.approx(est.params_per_gpu * 10 / 1e9)


def test_bf16_3d_on_a_cpu_is_refused_before_building():
    from calm_dist.parallel.state import current_layout
    from calm_dist.engines.megatron_3d import build_3d_engine

    ensure_model_parallel()
    cfg = _config("tiny_baseline", SHAPE + ["parallel.regime=3d", "parallel.zero_stage=1", "training.precision=bf16"])
    with pytest.raises(ValueError, match="training.precision=fp32"):
        build_3d_engine(cfg, current_layout(), torch.device("cpu"))


def test_pipeline_chunks_keep_the_modules_their_kind_places_there():
    from calm_dist.models.kinds import AUTOENCODER, BASELINE
    from calm_dist.parallel.pipeline import strip_to_stage

    cfg = _config("tiny_baseline", SHAPE)
    first = strip_to_stage(BASELINE.build(cfg, None, None), BASELINE, first=True, last=False)
    last = strip_to_stage(BASELINE.build(cfg, None, None), BASELINE, first=False, last=True)
    assert first.embed_tokens is not None and first.lm_head is None
    assert last.embed_tokens is None and last.lm_head is not None
    with pytest.raises(ValueError, match="the autoencoder cannot be pipelined"):
        strip_to_stage(Autoencoder(cfg.autoencoder), AUTOENCODER, first=True, last=False)


def test_megatron_clipping_reports_the_global_norm_and_clips_to_the_limit(seed_files):
    """One process, TP = PP = 1: the optimizer steps on megatron DDP's reduced buffers, clipped
    by megatron-core to optimizer.grad_clip, which holds only if the reported norm is theirs."""
    from calm_dist.parallel.state import current_layout, seed_model_building
    from calm_dist.engines.megatron_3d import build_3d_engine

    ensure_model_parallel()
    cfg = _config("tiny_baseline", SHAPE + ["parallel.regime=3d", "parallel.zero_stage=0", "optimizer.grad_clip=0.05"])
    seed_model_building(cfg.training.seed, current_layout())
    engine = build_3d_engine(cfg, current_layout(), torch.device("cpu"))
    seen = {}
    # The optimizer's step sees the clipped gradients; a pre-hook records them and the buffers'.
    engine.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.update(
        clipped=torch.stack([p.grad.norm() for p in engine.params]).norm().item(),
        in_buffers=all(p.grad.data_ptr() == p.main_grad.data_ptr() for p in engine.params)))
    tokens = torch.randint(1, 90, (2, cfg.derived.block_tokens))
    engine.train_batch([tokens])
    assert seen["in_buffers"]  # the optimizer reads megatron DDP's reduced buffers
    assert engine.get_global_grad_norm() > 0.05  # the limit was binding
    assert seen["clipped"] == pytest.approx(0.05, rel=1e-5)


def test_a_non_finite_gradient_skips_the_step_without_touching_the_weights(seed_files):
    """One process, TP = PP = 1: an infinite gradient (finite loss) is never applied."""
    from calm_dist.parallel.state import current_layout, seed_model_building
    from calm_dist.engines.megatron_3d import build_3d_engine

    ensure_model_parallel()
    cfg = _config("tiny_baseline", SHAPE + ["parallel.regime=3d", "parallel.zero_stage=0"])
    seed_model_building(cfg.training.seed, current_layout())
    engine = build_3d_engine(cfg, current_layout(), torch.device("cpu"))
    tokens = torch.randint(1, 90, (2, cfg.derived.block_tokens))
    assert engine.train_batch([tokens]) is not None  # a normal step
    before = {k: v.clone() for k, v in engine.module.state_dict().items() if isinstance(v, torch.Tensor)}
    handle = engine.module.lm_head.weight.register_hook(lambda grad: grad * float("inf"))
    assert engine.train_batch([tokens]) is None
    handle.remove()
    after = engine.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert engine.train_batch([tokens]) is not None  # and training goes on
