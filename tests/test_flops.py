"""The documented FLOPs formula (calm_dist/flops.py): the paper's Table 1, torch's FlopCounterMode on
real forward/backward passes, and the device peak table behind MFU."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from calm_dist.config import load_config, validate
from calm_dist.flops import (
    achieved_tflops,
    autoencoder_flops_per_token,
    baseline_flops_per_token,
    calm_flops_per_token,
    compute_precision,
    mfu_percent,
    peak_tflops,
    training_flops_per_token,
)
from calm_dist.parallel.state import ensure_model_parallel

# Paper Table 1 (CALM.md §5.1): training FLOPs in total (1e20) and inference FLOPs per token (1e8).
TABLE_1 = {
    "transformer_s": (6.6, 4.4), "transformer_m": (11.9, 7.9), "transformer_l": (22.5, 15.0),
    "calm_m": (3.7, 2.9), "calm_l": (7.7, 4.6), "calm_xl": (19.5, 9.4),
}
# Training tokens behind Table 1: 250k steps of "2M" tokens read as 2e6, i.e. 5e11 (CALM.md §5.3).
# The exact 250k x 2,097,152 = 5.24e11 would put every row ~4.9% higher.
PAPER_TRAIN_TOKENS = 5e11
PAPER_CONTEXT = 2048  # steps: chunks for CALM, tokens for the baselines
# CALM-XL training comes out 8.6% high, and no prefactors fix it: any a*trunk + b*head (a, b >= 0)
# gives an XL / L ratio between the trunk's (2.59) and the head's (2.77), while Table 1 has
# 19.5 / 7.7 = 2.53; a constant term large enough to close that would put CALM-M ~20% off.
# The paper's XL accounting differs from its stated shapes in a way we cannot recover.
TRAIN_TOLERANCE = {"calm_xl": 0.09}


@pytest.fixture(scope="module")
def model_parallel():
    ensure_model_parallel()


def paper_cfg(preset: str):
    return validate(load_config([preset]))


@pytest.mark.parametrize("preset", sorted(TABLE_1))
def test_reproduces_table_1(preset):
    cfg = paper_cfg(preset)
    paper_train, paper_infer = TABLE_1[preset]
    assert cfg.derived.steps_per_block == PAPER_CONTEXT
    train_total = training_flops_per_token(cfg) * PAPER_TRAIN_TOKENS / 1e20
    if preset.startswith("calm"):
        infer = calm_flops_per_token(cfg.model, cfg.autoencoder, PAPER_CONTEXT, training=False) / 1e8
    else:
        infer = baseline_flops_per_token(cfg.model, PAPER_CONTEXT, training=False) / 1e8
    assert train_total == pytest.approx(paper_train, rel=TRAIN_TOLERANCE.get(preset, 0.05))
    assert infer == pytest.approx(paper_infer, rel=0.05)


def test_calm_m_is_cheaper_than_transformer_s_as_the_paper_claims():
    """Headline claim: 44% fewer training and 34% fewer inference FLOPs (CALM.md §5.1)."""
    calm, base = paper_cfg("calm_m"), paper_cfg("transformer_s")
    train_ratio = training_flops_per_token(calm) / training_flops_per_token(base)
    infer_ratio = (calm_flops_per_token(calm.model, calm.autoencoder, 2048, training=False)
                   / baseline_flops_per_token(base.model, 2048, training=False))
    assert train_ratio == pytest.approx(1 - 0.44, abs=0.03)
    assert infer_ratio == pytest.approx(1 - 0.34, abs=0.03)


def test_inference_samples_scale_head_and_decoder():
    """The batch temperature sampler runs the head and the decoder T times per step."""
    cfg = paper_cfg("calm_m")
    one = calm_flops_per_token(cfg.model, cfg.autoencoder, 2048, training=False)
    many = calm_flops_per_token(cfg.model, cfg.autoencoder, 2048, training=False, num_samples=200)
    assert many > 50 * one  # the AE decoder's vocabulary projection dominates


def tiny_overrides(stage: str) -> list[str]:
    return [
        f"training.stage={stage}", "model.vocab_size=97", "model.pad_token_id=96", "model.bos_token_id=0",
        "model.eos_token_id=0", "model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4",
        "model.intermediate_size=344", "model.max_position_embeddings=64", "data.seq_length=64",
        "autoencoder.hidden_size=128", "autoencoder.intermediate_size=320", "autoencoder.latent_size=32",
        "model.latent_size=32", "model.num_target_samples=4",
    ]


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_baseline_forward_matches_flop_counter(model_parallel):
    """FlopCounterMode counts a multiply-add as 2 FLOPs and attention as full (non-causal) matmuls,
    like our formula. With the `local` backend megatron's baddbmm/bmm attention is counted. With
    `sdpa` on CPU, torch 2.13 dispatches to `_scaled_dot_product_flash_attention_for_cpu`, which has
    no FLOP formula: the counter sees 0 for attention there (the CUDA flash/efficient/cuDNN kernels
    are counted)."""
    from calm_dist.models.baseline import TokenBaseline

    cfg = validate(load_config(["tiny_baseline"], tiny_overrides("baseline")))
    batch, ctx = 2, cfg.data.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, ctx))
    formula = baseline_flops_per_token(cfg.model, ctx, training=False) * batch * ctx
    attention = 4 * cfg.model.num_layers * ctx * cfg.model.hidden_size * batch * ctx
    for backend, expected in (("local", formula), ("sdpa", formula - attention)):
        model = TokenBaseline(cfg.model, attention_backend=backend)
        with torch.no_grad():
            counted = counted_flops(lambda: model.logits(tokens))
        assert counted == pytest.approx(expected, rel=0.01), backend  # only the norm weights differ


def test_calm_training_step_matches_flop_counter(model_parallel):
    """Forward + backward of CALM (frozen autoencoder forward only) against the training formula."""
    from calm_dist.models.autoencoder import Autoencoder
    from calm_dist.models.calm import CALM

    cfg = validate(load_config(["tiny_calm"], tiny_overrides("calm")))
    model = CALM(cfg.model, Autoencoder(cfg.autoencoder), attention_backend="local")
    k, steps = cfg.model.patch_size, cfg.derived.steps_per_block
    tokens = torch.randint(0, cfg.model.vocab_size, (1, (steps + 1) * k))
    counted = counted_flops(lambda: model(tokens).loss.backward())
    assert counted == pytest.approx(training_flops_per_token(cfg) * steps * k, rel=0.05)


def test_autoencoder_formula_is_exact(model_parallel):
    from calm_dist.models.autoencoder import Autoencoder

    cfg = validate(load_config(["tiny_autoencoder"], tiny_overrides("autoencoder")))
    ae = Autoencoder(cfg.autoencoder)
    chunks = torch.randint(0, cfg.model.vocab_size, (2, 8, cfg.autoencoder.patch_size))
    tokens = chunks.numel()
    with torch.no_grad():
        forward = counted_flops(lambda: ae.decode(ae.encode(chunks)[0]))
    assert forward == autoencoder_flops_per_token(cfg.autoencoder, training=False) * tokens
    train = counted_flops(lambda: ae(chunks).loss.backward())
    assert train == autoencoder_flops_per_token(cfg.autoencoder, training=True) * tokens
    assert training_flops_per_token(cfg) == autoencoder_flops_per_token(cfg.autoencoder, training=True)


def test_vocabulary_drives_calm_inference_cost():
    """CALM.md §9.13: the AE decoder's vocabulary projection scales with V."""
    cfg = paper_cfg("calm_m")
    small = validate(load_config(["calm_m"], ["model.vocab_size=4097", "model.pad_token_id=4096",
                                              "model.bos_token_id=0", "model.eos_token_id=0"]))
    big = calm_flops_per_token(cfg.model, cfg.autoencoder, 2048, training=False)
    little = calm_flops_per_token(small.model, small.autoencoder, 2048, training=False)
    d_ae, k = cfg.autoencoder.hidden_size, cfg.model.patch_size
    assert big - little == pytest.approx(2 * d_ae * (128257 - 4097) * k / k)


# ---- device peaks and MFU ---------------------------------------------------------------------


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA GH200 480GB", "tf32", 494.7),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
    ("NVIDIA L40S", "bf16", 362.05),
    ("NVIDIA L4", "bf16", 121.0),
])
def test_peak_table(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_peak_unknown_cpu_and_override(caplog):
    peak_tflops.cache_clear()
    with caplog.at_level(logging.INFO, logger="calm_dist.flops"):
        assert peak_tflops("cpu", "fp32") is None
        assert peak_tflops("cpu", "fp32") is None  # the note comes once
        assert peak_tflops("NVIDIA A10G", "bf16") is None  # not the A10
        assert peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 tensor cores
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 3 and all("logging.peak_tflops" in n for n in notes)
    assert peak_tflops("cpu", "fp32", override=1.5) == 1.5
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16", override=700.0) == 700.0


def test_mfu_and_precision():
    assert achieved_tflops(6e9, 1e5) == pytest.approx(600.0)
    assert mfu_percent(6e9, 1e5, 1000.0) == pytest.approx(60.0)
    assert mfu_percent(6e9, 1e5, None) is None
    assert compute_precision("bf16") == "bf16"
    assert compute_precision("fp32") in ("fp32", "tf32")
