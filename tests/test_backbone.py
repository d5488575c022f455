"""The megatron-core backbone on CPU (real megatron layers, no mocks), its attention backends, the
KV cache, and the CPU compatibility layer. `gpu` tests compare each fast backend with `local`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from calm_dist.compat.megatron_cpu import apply_cpu_compat
from calm_dist.config.schema import ModelConfig
from calm_dist.parallel.state import ensure_model_parallel

HIDDEN = 64


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    ensure_model_parallel()  # megatron's parallel state is process-global: once per module


def small_cfg(**overrides) -> ModelConfig:
    fields = dict(
        hidden_size=HIDDEN, intermediate_size=160, num_layers=2, num_attention_heads=4,
        max_position_embeddings=32,
    )  # fmt: skip
    return ModelConfig(**{**fields, **overrides})


def backbone(cfg: ModelConfig, backend: str, **kwargs):
    from calm_dist.models.backbone import Backbone

    return Backbone(cfg, attention_backend=backend, **kwargs)


def inputs(batch: int = 3, steps: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, steps, HIDDEN, generator=torch.Generator().manual_seed(seed))


def with_distinct_norm_weights(model):
    """RMSNorm weights start at 1: draw them, so that applying the wrong norm (or none) shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
    return model


@pytest.mark.parametrize("backend", ["sdpa", "local"])
def test_forward_backward_gives_finite_grads_everywhere(backend):
    model = backbone(small_cfg(attention_dropout=0.1, hidden_dropout=0.1), backend)
    x = inputs().requires_grad_()
    h = model(x)
    assert h.shape == x.shape
    (h * torch.randn_like(h)).mean().backward()  # not |h|^2: the final RMSNorm fixes its norm
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("num_query_groups", [0, 2])
def test_sdpa_equals_local_with_the_same_weights(num_query_groups):
    cfg = small_cfg(num_query_groups=num_query_groups)
    sdpa, local = backbone(cfg, "sdpa"), backbone(cfg, "local")
    local.load_state_dict(sdpa.state_dict())
    x = inputs()
    torch.testing.assert_close(sdpa(x), local(x), atol=1e-5, rtol=1e-5)


def test_later_steps_do_not_change_earlier_outputs():
    model = backbone(small_cfg(), "sdpa").eval()
    x = inputs()
    changed = x.clone()
    changed[:, 6:] = inputs(seed=1)[:, 6:]
    h, h_changed = model(x), model(changed)
    torch.testing.assert_close(h[:, :6], h_changed[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(h[:, 6:], h_changed[:, 6:])


@pytest.mark.parametrize("backend", ["sdpa", "local"])
@pytest.mark.parametrize("num_query_groups", [0, 2])
@pytest.mark.parametrize("path", ["plain", "megatron"])
def test_kv_cached_steps_equal_the_full_forward(backend, num_query_groups, path):
    model = with_distinct_norm_weights(backbone(small_cfg(num_query_groups=num_query_groups), backend).eval())
    x = inputs(batch=3, steps=10)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(batch_size=3, max_steps=16, path=path)
        steps = [model(x[:, :4], cache)] + [model(x[:, i : i + 1], cache) for i in range(4, 10)]
        assert cache.length == 10
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)

        cache.reset()  # a multi-step extension of a filled cache gives the same
        two_calls = torch.cat([model(x[:, :4], cache), model(x[:, 4:], cache)], dim=1)
        torch.testing.assert_close(two_calls, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["plain", "megatron"])
def test_kv_cache_refuses_training_mode_and_overflow(path):
    model = backbone(small_cfg(), "sdpa")
    with pytest.raises(RuntimeError, match="eval"):
        model(inputs(steps=2), model.new_cache(3, 4, path=path))
    model.eval()
    with pytest.raises(ValueError, match="do not fit"):
        model(inputs(steps=5), model.new_cache(3, 4, path=path))


def test_plain_kv_path_is_the_default_where_it_applies_and_refused_where_not():
    from calm_dist.models.backbone import BackboneOptions, KVCache
    from calm_dist.models.plain_decode import PlainKVCache

    model = backbone(small_cfg(), "sdpa").eval()
    assert isinstance(model.new_cache(2, 8), PlainKVCache)
    assert isinstance(model.new_cache(2, 8, path="megatron"), KVCache)
    first_stage = backbone(small_cfg(), "sdpa", options=BackboneOptions(post_process=False))
    assert isinstance(first_stage.new_cache(2, 8), KVCache)  # a pipeline stage is not the whole decoder
    with pytest.raises(ValueError, match="path='megatron'"):
        first_stage.new_cache(2, 8, path="plain")
    with pytest.raises(ValueError, match="auto, plain or megatron"):
        model.new_cache(2, 8, path="fast")


def test_plain_kv_path_keeps_positions_far_into_a_long_cache():
    """Keys are stored rotated at their own positions: a late step through the cache equals the
    full forward there, with RoPE's base small enough that positions matter at every frequency."""
    cfg = small_cfg(max_position_embeddings=64, rope_theta=100.0, num_query_groups=2)
    model = with_distinct_norm_weights(backbone(cfg, "sdpa").eval())
    x = inputs(batch=2, steps=40)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(batch_size=2, max_steps=64)
        model(x[:, :1], cache)
        steps = [model(x[:, i : i + 3], cache) for i in range(1, 40, 3)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 1:], atol=1e-5, rtol=1e-5)


def test_plain_kv_cache_takes_fewer_rows_and_refuses_more():
    model = with_distinct_norm_weights(backbone(small_cfg(), "sdpa").eval())
    x = inputs(batch=2, steps=6)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(batch_size=3, max_steps=8)
        steps = torch.cat([model(x[:, :3], cache), model(x[:, 3:], cache)], dim=1)
        torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="batch of 3"):
            model(inputs(batch=4, steps=1), model.new_cache(batch_size=3, max_steps=8))
        cache.reset()  # the same cache in another dtype: new buffers
        torch.testing.assert_close(model.double()(x.double(), cache), full.double(), atol=1e-5, rtol=1e-5)


def _reference_attention(q, k, v, allowed):
    """Plain softmax attention, heads-first [b, h, s, d]; `allowed` [sq, sk] boolean."""
    scores = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def test_sdpa_core_attention_is_bottom_right_causal_with_gqa():
    from megatron.core.transformer.enums import AttnMaskType

    from calm_dist.models.attention import SDPACoreAttention, bottom_right_causal_mask
    from calm_dist.models.backbone import transformer_config

    config = transformer_config(small_cfg(num_query_groups=2), torch.float32)
    attention = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(0)
    sq, sk, b, heads, groups, d = 3, 7, 2, 4, 2, HIDDEN // 4
    query = torch.randn(sq, b, heads, d, generator=g)
    key, value = (torch.randn(sk, b, groups, d, generator=g) for _ in range(2))

    out = attention(query, key, value, None, attn_mask_type=AttnMaskType.no_mask)

    allowed = bottom_right_causal_mask(sq, sk, query.device)
    assert allowed.tolist()[0] == [True] * 5 + [False] * 2  # query 0 sees keys <= sk - sq
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
    expected = _reference_attention(q, k, v, allowed).permute(2, 0, 1, 3).reshape(sq, b, -1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_init_statistics():
    cfg = small_cfg(num_layers=1, intermediate_size=256)
    params = dict(backbone(cfg, "sdpa").named_parameters())
    layer = "decoder.layers.0."
    for name in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
        weight = params[layer + name + ".weight"]
        assert abs(weight.std().item() - cfg.init_std) < 0.1 * cfg.init_std, name
        assert abs(weight.mean().item()) < 0.1 * cfg.init_std, name
    norms = [p for name, p in params.items() if "layernorm" in name]
    assert len(norms) == 3 and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    assert not any(name.endswith("bias") for name in params)


@pytest.mark.parametrize("num_query_groups", [0, 2])
def test_param_count_formula_matches_the_built_model(num_query_groups):
    from calm_dist.models.param_counts import backbone_param_count

    cfg = small_cfg(num_query_groups=num_query_groups, num_layers=3)
    model = backbone(cfg, "local")
    assert backbone_param_count(cfg) == sum(p.numel() for p in model.parameters())


def test_param_count_formula_matches_the_paper_backbone():
    from calm_dist.models.param_counts import backbone_param_count

    cfg = ModelConfig(hidden_size=1024, intermediate_size=2752, num_layers=16, num_attention_heads=16)
    assert round(backbone_param_count(cfg) / 1e6, 1) == 202.4  # CALM-M's 16 layers (CALM.md §2.3)


def test_resolve_attention_backend_on_cpu(caplog):
    from calm_dist.models.attention import AttentionBackendUnavailable, resolve_attention_backend

    cpu = torch.device("cpu")
    with caplog.at_level("INFO", logger="calm_dist.models.attention"):
        assert resolve_attention_backend("auto", cpu) == "sdpa"
    assert "attention backend: sdpa" in caplog.text
    assert resolve_attention_backend("local", cpu) == "local"
    for name in ("flash_attn", "te"):
        with pytest.raises(AttentionBackendUnavailable, match="needs a CUDA GPU"):
            resolve_attention_backend(name, cpu)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_attention_backend("flash", cpu)


def test_a_model_loaded_for_the_cpu_of_a_gpu_node_gets_a_cpu_attention_backend(monkeypatch):
    """`calm-eval --device cpu` on a GPU node with Transformer Engine installed: the backend follows
    the device the model will run on, not the machine. The GPU and TE are stand-ins (this machine
    has neither); auto would pick te for a model bound for the GPU."""
    from calm_dist.config import load_config, validate
    from calm_dist.models import attention
    from calm_dist.pretrained import build_for_stage

    apply_cpu_compat()
    ensure_model_parallel()  # both on the CPU, before the stand-in GPU appears
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "_importable", lambda name: name == "te")
    assert attention.resolve_attention_backend("auto", torch.device("cuda")) == "te"
    cfg = validate(load_config(["tiny_baseline"], ["model.num_layers=1"]))
    assert build_for_stage(cfg, device="cpu").backbone.attention_backend == "sdpa"


def test_cpu_compat_is_applied_once_and_maps_cuda_to_cpu():
    assert apply_cpu_compat() is False  # the fixture already applied it
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().to("cuda").device.type == "cpu"
    torch.cuda.manual_seed(7)
    assert torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())


def test_megatron_checkpoint_recomputes_the_same_dropout_on_cpu():
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()

    def dropped(x):
        with tracker.fork():
            return torch.nn.functional.dropout(x, 0.5, training=True) * x

    x = torch.randn(256, requires_grad=True)
    tracker_states, cpu_state = tracker.get_states(), torch.get_rng_state()
    dropped(x).sum().backward()
    plain_grad, x.grad = x.grad, None
    tracker.set_states(tracker_states)
    torch.set_rng_state(cpu_state)
    tensor_parallel.checkpoint(dropped, False, x).sum().backward()
    assert torch.equal(x.grad, plain_grad) and (plain_grad == 0).any()


def test_ensure_model_parallel_is_idempotent_and_rejects_other_sizes():
    ensure_model_parallel()
    with pytest.raises(ValueError, match="already initialised"):
        ensure_model_parallel(tensor_parallel=2)


def test_cpu_compat_is_inert_when_cuda_is_present():
    # Patching is process-wide, so this runs in a fresh interpreter.
    script = textwrap.dedent(
        """
        import torch
        torch.cuda.is_available = lambda: True
        from calm_dist.compat import megatron_cpu

        names = [(torch, n) for n in megatron_cpu._FACTORIES] + [
            (torch.Tensor, "to"), (torch.Tensor, "cuda"), (torch.cuda, "current_device"),
            (torch.cuda, "synchronize"), (torch.cuda, "get_rng_state"), (torch.cuda, "manual_seed"),
        ]
        before = [getattr(owner, name) for owner, name in names]
        assert megatron_cpu.apply_cpu_compat() is False
        assert [getattr(owner, name) for owner, name in names] == before
        assert "megatron.core" not in __import__("sys").modules
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=_env_with_repo_on_path())  # fmt: skip
    assert result.returncode == 0, result.stderr


def _env_with_repo_on_path() -> dict:
    import os
    from pathlib import Path

    import calm_dist

    repo = str(Path(calm_dist.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}


# -- GPU: each fast backend against megatron's unfused attention, bf16 --------------------------


def _local_to(name: str, backend: str) -> str:
    """Parameter name in a `local` backbone for `name` in a `backend` one (TE fuses the norms)."""
    if backend != "te":
        return name
    return name.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight").replace(
        "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"
    )


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def _cuda_backbone_or_skip(cfg: ModelConfig, backend: str):
    from calm_dist.models.attention import AttentionBackendUnavailable

    try:
        return backbone(cfg, backend, params_dtype=torch.bfloat16).cuda()
    except AttentionBackendUnavailable as err:  # flash-attn / TE not installed on this machine
        pytest.skip(str(err))


GPU_CFG = dict(hidden_size=256, num_attention_heads=4, num_query_groups=2, intermediate_size=512)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn", "te"])
def test_backend_matches_local_on_cuda_in_bf16(backend):
    cfg = small_cfg(**GPU_CFG)
    local = backbone(cfg, "local", params_dtype=torch.bfloat16).cuda()
    model = _cuda_backbone_or_skip(cfg, backend)
    local_params = dict(local.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(local_params[_local_to(name, backend)])

    x = torch.randn(2, 64, cfg.hidden_size, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    x_local, x_model = x.bfloat16().requires_grad_(), x.bfloat16().requires_grad_()
    h_local, h_model = local(x_local), model(x_model)
    assert _relative_error(h_model, h_local) < 3e-2
    weights = torch.randn(h_local.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    (h_local.float() * weights).mean().backward()  # not |h|^2: the final RMSNorm fixes its norm
    (h_model.float() * weights).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert _relative_error(x_model.grad, x_local.grad) < 3e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn", "te", "local"])
@pytest.mark.parametrize("path", ["auto", "megatron"])
def test_kv_cache_on_cuda_in_bf16(backend, path):
    model = _cuda_backbone_or_skip(small_cfg(**GPU_CFG), backend).eval()
    x = torch.randn(2, 24, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).bfloat16()
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(batch_size=2, max_steps=32, path=path)
        steps = [model(x[:, :8], cache)] + [model(x[:, i : i + 1], cache) for i in range(8, 20)]
        steps.append(model(x[:, 20:], cache))  # several steps into a filled cache: an explicit mask
    assert _relative_error(torch.cat(steps, dim=1), full) < 3e-2


@pytest.mark.gpu
@needs_cuda
def test_backbone_is_built_whole_on_the_callers_device():
    """On a GPU machine megatron would put its linears on the GPU whatever the caller's device;
    the torch norms follow the default device. Both must land together."""
    cfg = small_cfg(**GPU_CFG)
    on_cpu = backbone(cfg, "sdpa")
    with torch.device("cuda"):
        on_gpu = backbone(cfg, "sdpa")
    assert {p.device.type for p in on_cpu.parameters()} == {"cpu"}
    assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}


def test_rope_makes_outputs_depend_on_positions_with_the_configured_base():
    """Without positions, causal attention at the last step is invariant to the order of the
    steps before it; with RoPE it is not. The rotary frequencies use rope_theta."""
    cfg = small_cfg(rope_theta=10000.0)
    model = backbone(cfg, "sdpa").eval()
    x = inputs(batch=1, steps=8)
    permuted = torch.cat([x[:, [2, 0, 5, 1, 6, 3, 4]], x[:, 7:]], dim=1)
    with torch.no_grad():
        last, last_permuted = model(x)[:, -1], model(permuted)[:, -1]
    assert not torch.allclose(last, last_permuted, atol=1e-4)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = model.rotary(4)  # [steps, 1, 1, head_dim]: position p's angles are p * inv_freq, twice
    assert angles.shape == (4, 1, 1, head_dim)
    assert torch.allclose(angles[1, 0, 0], torch.cat([expected, expected]))
    assert torch.allclose(angles[3, 0, 0], 3 * torch.cat([expected, expected]))


@pytest.mark.parametrize("head_dim,base", [(16, 10000.0), (64, 10000.0), (128, 500000.0)])
def test_our_rope_table_is_megatrons_bit_for_bit(head_dim, base):
    """calm_dist/models/rope.py replaces megatron's RotaryEmbedding (which moves its frequencies to
    the current CUDA device whatever the model's): the same float32 numbers, exactly."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from calm_dist.models.rope import RopeTable

    ensure_model_parallel()
    theirs = RotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, rotary_base=base, use_cpu_initialization=True)
    ours = RopeTable(head_dim, base)
    for steps in (1, 7, 2048):
        assert torch.equal(ours(steps, torch.device("cpu")), theirs(steps))
    # asked for another device, it is made there (megatron's would go to the current CUDA device)
    assert ours(5, torch.device("meta")).device.type == "meta"
