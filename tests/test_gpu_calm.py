"""GPU-only: CALM-M forward and backward on one GPU in bf16 (run on the device machine with
`pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch

from calm_dist.config import load_config, validate
from calm_dist.models.autoencoder import Autoencoder
from calm_dist.models.calm import CALM
from calm_dist.models.param_counts import calm_param_count
from calm_dist.parallel.state import ensure_model_parallel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_calm_m_forward_backward_on_one_gpu_in_bf16():
    ensure_model_parallel()
    cfg = validate(load_config(["calm_m"], ["data.seq_length=2048"]))
    torch.manual_seed(0)
    model = CALM(cfg.model, Autoencoder(cfg.autoencoder)).cuda().to(torch.bfloat16)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == calm_param_count(cfg.model)
    tokens = torch.randint(0, cfg.model.vocab_size - 1, (2, cfg.derived.block_tokens), device="cuda")
    out = model(tokens)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.num_positions == 2 * 512
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.autoencoder.parameters())


def test_3d_engine_steps_in_bf16_on_one_gpu():
    """The 3d regime's engine (TP = PP = 1 on one GPU) takes bf16 autocast steps with fp32
    weights: finite losses that fall on a repeated batch."""
    from calm_dist.parallel.state import current_layout, seed_model_building, seed_training
    from calm_dist.engines.megatron_3d import build_3d_engine

    ensure_model_parallel()
    cfg = validate(load_config(["tiny_baseline"], ["parallel.regime=3d", "parallel.zero_stage=1",
                                                   "training.precision=bf16", "optimizer.warmup_steps=0"]))
    layout = current_layout()
    seed_model_building(cfg.training.seed, layout)
    engine = build_3d_engine(cfg, layout, torch.device("cuda"))
    seed_training(cfg.training.seed, layout)
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    tokens = torch.randint(1, 4000, (cfg.training.micro_batch_size, cfg.derived.block_tokens), device="cuda")
    losses = [engine.train_batch([tokens])["loss"] for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_a_model_left_on_the_cpu_runs_on_a_gpu_machine():
    """`calm-eval --device cpu` on a GPU node: megatron's RoPE table used to move itself to the
    current CUDA device at the first forward, whatever the model's device (calm_dist/models/rope.py)."""
    from calm_dist.models.baseline import TokenBaseline

    ensure_model_parallel()
    cfg = validate(load_config(["tiny_baseline"], ["model.attention_backend=sdpa"]))
    torch.manual_seed(0)
    model = TokenBaseline(cfg.model).eval()
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    tokens = torch.randint(0, cfg.model.vocab_size - 1, (2, 33))
    with torch.no_grad():
        on_cpu = model.logits(tokens)
        on_gpu = model.cuda().logits(tokens.cuda())
    assert on_cpu.device.type == "cpu" and on_gpu.device.type == "cuda"
    assert torch.allclose(on_cpu, on_gpu.cpu(), atol=1e-3)


def test_a_model_loaded_for_the_cpu_of_a_gpu_machine_gets_a_backend_that_runs_there():
    """The loaders build for the device they were given: with `auto`, a GPU machine with flash-attn
    or Transformer Engine installed must still give a CPU-bound model a CPU backend."""
    from calm_dist.pretrained import build_for_stage

    ensure_model_parallel()
    cfg = validate(load_config(["tiny_baseline"], ["model.attention_backend=auto"]))
    model = build_for_stage(cfg, device="cpu").eval()
    assert model.backbone.attention_backend == "sdpa"
    with torch.no_grad():
        assert torch.isfinite(model.logits(torch.randint(0, cfg.model.vocab_size - 1, (2, 33)))).all()
