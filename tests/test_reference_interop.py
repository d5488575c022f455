"""The reference implementation's checkpoints in and out of calm-dist (calm-convert import-reference /
export-reference, training.init_weights from a reference directory).

Reference directories are written here from the documented facts of its format (docs/checkpoints.md,
"The reference format"): its config.json fields and its tensor names, with random values. The
imported model is then checked against an independent path: a small pure-torch forward of the
reference's architecture that reads the reference's tensors by their own names (separate q/k/v,
gate/up, the Llama rotary convention, the head under mlp_generator.*). A wrong name, a wrong fused
layout or a wrong split of the autoencoder's layers shows up as a different output.
"""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from calm_dist.convert.cli import main as convert_main
from calm_dist.weights_file import load_safetensors
from tests.train_utils import prepared_corpus_overrides

EPS = 1e-6
D, FFN, HEADS, LAYERS, K, LATENT, NOISE, BLOCKS = 64, 172, 4, 2, 4, 16, 8, 2
AE_D, AE_FFN, AE_LAYERS = 32, 80, 2


@dataclass(frozen=True)
class Dims:
    """The sizes of the reference models written here: tiny by default, CALM-M for the smoke test."""

    d: int = D
    ffn: int = FFN
    heads: int = HEADS
    layers: int = LAYERS
    latent: int = LATENT
    noise: int = NOISE
    blocks: int = BLOCKS
    ae_d: int = AE_D
    ae_ffn: int = AE_FFN
    max_positions: int = 64


TINY_DIMS = Dims()
# The paper's CALM-M (and its autoencoder) with the Llama-3 vocabulary plus PAD.
CALM_M_DIMS = Dims(d=1024, ffn=2752, heads=16, layers=16, latent=128, noise=64, blocks=4, ae_d=512, ae_ffn=1280,
                   max_positions=2048)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    listed = prepared_corpus_overrides(tmp_path_factory.mktemp("corpus"))
    overrides = dict(o.split("=", 1) for o in listed)
    return {"overrides": listed, "tokenizer": Path(overrides["data.tokenizer"]), "valid": overrides["data.valid_path"],
            "vocab": int(overrides["model.vocab_size"]), "pad": int(overrides["model.pad_token_id"]),
            "bos": int(overrides["model.bos_token_id"]), "eos": int(overrides["model.eos_token_id"])}


# -- reference directories, from the documented format ---------------------------------------------------
def ae_config(corpus, dims: Dims = TINY_DIMS) -> dict:
    return {"model_type": "autoencoder", "ae_dropout": 0.15, "kl_clamp": 0.5, "kl_weight": 1e-3, "patch_size": K,
            "vocab_size": corpus["vocab"], "hidden_size": dims.ae_d, "intermediate_size": dims.ae_ffn,
            "num_encoder_layers": AE_LAYERS, "num_decoder_layers": AE_LAYERS, "latent_size": dims.latent,
            "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": EPS, "pad_token_id": corpus["pad"],
            "bos_token_id": corpus["bos"], "eos_token_id": corpus["eos"], "tie_word_embeddings": True, "mlp_bias": False}


def calm_config(corpus, kv_heads: int, ae_path: str, dims: Dims = TINY_DIMS) -> dict:
    return {"model_type": "energy", "vocab_size": corpus["vocab"], "hidden_size": dims.d, "intermediate_size": dims.ffn,
            "num_hidden_layers": dims.layers, "num_attention_heads": dims.heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": dims.max_positions, "rope_theta": 10000.0, "rms_norm_eps": EPS, "initializer_range": 0.02,
            "hidden_act": "silu", "pad_token_id": corpus["pad"], "bos_token_id": corpus["bos"],
            "eos_token_id": corpus["eos"], "patch_size": K, "latent_size": dims.latent, "num_samples": 8, "beta": 1.0,
            "num_mlp_layers": dims.blocks, "noise_size": dims.noise, "ae_path": ae_path}


def _ae_layer_shapes(prefix: str, d: int, f: int) -> dict:
    return {f"{prefix}.layernorm.weight": (d,), f"{prefix}.mlp.gate_proj.weight": (f, d),
            f"{prefix}.mlp.up_proj.weight": (f, d), f"{prefix}.mlp.down_proj.weight": (d, f)}


def ae_shapes(vocab: int, dims: Dims = TINY_DIMS) -> dict:
    d, f, latent = dims.ae_d, dims.ae_ffn, dims.latent
    shapes = {"encoder.embed_tokens.weight": (vocab, d)}
    for i in range(AE_LAYERS):
        shapes |= _ae_layer_shapes(f"encoder.encoder_layers.{i}", d, f)
        shapes |= _ae_layer_shapes(f"decoder.decoder_layers.{i}", d, f)
    return shapes | {"encoder.squeeze_layer.weight": (d, K * d), "encoder.squeeze_layer.bias": (d,),
                     "encoder.norm.weight": (d,), "encoder.hidden_to_latent.weight": (2 * latent, d),
                     "encoder.hidden_to_latent.bias": (2 * latent,), "decoder.latent_to_hidden.weight": (d, latent),
                     "decoder.latent_to_hidden.bias": (d,), "decoder.expand_layer.weight": (K * d, d),
                     "decoder.expand_layer.bias": (K * d,), "decoder.norm.weight": (d,)}


def calm_shapes(vocab: int, kv_heads: int, dims: Dims = TINY_DIMS) -> dict:
    D, FFN, HEADS, LATENT, NOISE = dims.d, dims.ffn, dims.heads, dims.latent, dims.noise  # noqa: N806
    hd = D // HEADS
    shapes = {"transformer.embed_tokens.weight": (vocab, D), "embed_proj.0.weight": (2 * D, K * D),
              "embed_proj.0.bias": (2 * D,), "embed_proj.2.weight": (D, 2 * D), "embed_proj.2.bias": (D,),
              "embed_proj.3.weight": (D,), "embed_proj.3.bias": (D,), "transformer.norm.weight": (D,)}
    for i in range(dims.layers):
        p = f"transformer.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
                   f"{p}.self_attn.q_proj.weight": (HEADS * hd, D), f"{p}.self_attn.k_proj.weight": (kv_heads * hd, D),
                   f"{p}.self_attn.v_proj.weight": (kv_heads * hd, D), f"{p}.self_attn.o_proj.weight": (D, D),
                   f"{p}.mlp.gate_proj.weight": (FFN, D), f"{p}.mlp.up_proj.weight": (FFN, D),
                   f"{p}.mlp.down_proj.weight": (D, FFN)}
    head = {"noise_embd": (D, NOISE), "hidden_embd": (D, D), "final_layer.linears.0": (D, D),
            "final_layer.linears.2": (LATENT, D)}
    norms = ["norm_noise", "norm_hidden", "final_layer.in_ln"]
    for j in range(dims.blocks):
        head |= {f"mlp_blocks.{j}.linears.0": (D, 2 * D), f"mlp_blocks.{j}.linears.2": (D, D),
                 f"mlp_blocks.{j}.linears.4": (2 * D, D), f"mlp_blocks.{j}.down_proj": (D, D)}
        norms.append(f"mlp_blocks.{j}.in_ln")
    for name, shape in head.items():
        shapes |= {f"mlp_generator.{name}.weight": shape, f"mlp_generator.{name}.bias": (shape[0],)}
    for name in norms:
        shapes |= {f"mlp_generator.{name}.weight": (D,), f"mlp_generator.{name}.bias": (D,)}
    return shapes


def random_state(shapes: dict, seed: int | None) -> dict[str, torch.Tensor]:
    """Random values by name and shape (norm weights around 1); seed None: zeros (a size smoke test)."""
    if seed is None:
        return {name: torch.zeros(shape) for name, shape in shapes.items()}
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * (0.3 if len(shape) == 1 else 1 / math.sqrt(shape[-1])) + (
        1.0 if name.endswith(("norm.weight", "layernorm.weight", "in_ln.weight", "embed_proj.3.weight",
                              "norm_noise.weight", "norm_hidden.weight")) else 0.0) for name, shape in shapes.items()}


def write_reference(directory: Path, config: dict, state: dict, fmt: str, tokenizer: Path | None = None) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
    if tokenizer is not None:
        (directory / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return directory


def reference_autoencoder(root: Path, corpus, fmt: str = "bin", seed: int | None = 0,
                          dims: Dims = TINY_DIMS) -> tuple[Path, dict]:
    state = random_state(ae_shapes(corpus["vocab"], dims), seed)
    if fmt == "bin":  # the tied output projection: the same tensor under a second name
        state["decoder.lm_head_weight"] = state["encoder.embed_tokens.weight"]
    return write_reference(root, ae_config(corpus, dims), state, fmt, corpus["tokenizer"]), state


def reference_calm(root: Path, corpus, kv_heads: int, fmt: str = "bin", dims: Dims = TINY_DIMS,
                   random: bool = True) -> tuple[Path, dict, dict]:
    ae_dir, ae_state = reference_autoencoder(root / "ae", corpus, "bin", seed=1 if random else None, dims=dims)
    state = random_state(calm_shapes(corpus["vocab"], kv_heads, dims), 2 if random else None)
    if fmt == "bin":  # registered twice in the reference: both names, one tensor
        state |= {"generative_head." + k[len("mlp_generator."):]: v for k, v in state.items() if k.startswith("mlp_generator.")}
    # safetensors cannot hold one tensor twice: the tied copy is left out, as a safetensors save does
    state |= {"ae_model." + k: v for k, v in ae_state.items() if fmt == "bin" or k != "decoder.lm_head_weight"}
    directory = write_reference(root / "calm", calm_config(corpus, kv_heads, str(ae_dir), dims), state, fmt,
                                corpus["tokenizer"])
    return directory, state, ae_state


# -- the reference's forward, from its own tensor names -------------------------------------------------------
def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def ln(x, W, name):
    return F.layer_norm(x, (x.shape[-1],), W[f"{name}.weight"], W[f"{name}.bias"], eps=EPS)


def lin(x, W, name, bias=True):
    return F.linear(x, W[f"{name}.weight"], W[f"{name}.bias"] if bias else None)


def swiglu(x, W, p):
    return lin(F.silu(lin(x, W, f"{p}.gate_proj", False)) * lin(x, W, f"{p}.up_proj", False), W, f"{p}.down_proj", False)


def ref_encode(W, tokens_BCK):
    b, c, k = tokens_BCK.shape
    h = W["encoder.embed_tokens.weight"][tokens_BCK]
    for i in range(AE_LAYERS):
        if i == AE_LAYERS // 2:  # the first half per token, then the squeeze to one vector per chunk
            h = lin(h.reshape(b, c, k * AE_D), W, "encoder.squeeze_layer")
        p = f"encoder.encoder_layers.{i}"
        h = h + swiglu(rms(h, W[f"{p}.layernorm.weight"]), W, f"{p}.mlp")
    return lin(rms(h, W["encoder.norm.weight"]), W, "encoder.hidden_to_latent").chunk(2, dim=-1)


def ref_decode(W, z_BCL):
    b, c, _ = z_BCL.shape
    h = lin(z_BCL, W, "decoder.latent_to_hidden")
    for i in range(AE_LAYERS):
        if i == AE_LAYERS // 2:
            h = lin(h, W, "decoder.expand_layer").reshape(b, c, K, AE_D)
        p = f"decoder.decoder_layers.{i}"
        h = h + swiglu(rms(h, W[f"{p}.layernorm.weight"]), W, f"{p}.mlp")
    return rms(h, W["decoder.norm.weight"]) @ W["encoder.embed_tokens.weight"].t()


def rotate(x, theta=10000.0):  # the Llama convention: halves rotated, not interleaved pairs
    s, hd = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.arange(s, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def ref_backbone(W, tokens_BT, kv_heads):
    b, t = tokens_BT.shape
    e = W["transformer.embed_tokens.weight"][tokens_BT].reshape(b, t // K, K * D)
    x = ln(lin(F.silu(lin(e, W, "embed_proj.0")), W, "embed_proj.2"), W, "embed_proj.3")
    s, hd = x.shape[1], D // HEADS
    for i in range(LAYERS):
        p = f"transformer.layers.{i}.self_attn"
        n = rms(x, W[f"transformer.layers.{i}.input_layernorm.weight"])
        q = lin(n, W, f"{p}.q_proj", False).view(b, s, HEADS, hd).transpose(1, 2)
        k = lin(n, W, f"{p}.k_proj", False).view(b, s, kv_heads, hd).transpose(1, 2)
        v = lin(n, W, f"{p}.v_proj", False).view(b, s, kv_heads, hd).transpose(1, 2)
        k, v = k.repeat_interleave(HEADS // kv_heads, 1), v.repeat_interleave(HEADS // kv_heads, 1)
        att = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True)
        x = x + lin(att.transpose(1, 2).reshape(b, s, D), W, f"{p}.o_proj", False)
        x = x + swiglu(rms(x, W[f"transformer.layers.{i}.post_attention_layernorm.weight"]), W, f"transformer.layers.{i}.mlp")
    return rms(x, W["transformer.norm.weight"])


def ref_head(W, h, noise):
    G = {k[len("mlp_generator."):]: v for k, v in W.items() if k.startswith("mlp_generator.")}
    c = ln(lin(h, G, "hidden_embd"), G, "norm_hidden")
    s = ln(lin(noise, G, "noise_embd"), G, "norm_noise")
    c = c.expand(*s.shape[:-1], c.shape[-1])
    for j in range(BLOCKS):
        p = f"mlp_blocks.{j}"
        t = lin(F.silu(lin(torch.cat([ln(s, G, f"{p}.in_ln"), c], -1), G, f"{p}.linears.0")), G, f"{p}.linears.2")
        gate, up = lin(F.silu(t), G, f"{p}.linears.4").chunk(2, -1)
        s = s + lin(F.silu(gate) * up, G, f"{p}.down_proj")
    return lin(F.silu(lin(ln(s, G, "final_layer.in_ln"), G, "final_layer.linears.0")), G, "final_layer.linears.2")


def imported(path: Path):
    from calm_dist.pretrained.converted import load_converted

    return load_converted(path).model


def convert(*argv) -> int:
    return convert_main([str(a) for a in argv])


# -- import ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_a_reference_autoencoder_imports_exactly(corpus, tmp_path, fmt):
    src, state = reference_autoencoder(tmp_path / "ref", corpus, fmt)
    assert convert("import-reference", src, tmp_path / "out") == 0
    model = imported(tmp_path / "out")
    tokens = torch.randint(0, corpus["vocab"], (2, 3, K), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mu, log_sigma = model.encode(tokens)
        ref_mu, ref_log_sigma = ref_encode(state, tokens)
        torch.testing.assert_close(mu, ref_mu, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(log_sigma, ref_log_sigma, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(mu), ref_decode(state, mu), rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "calm_autoencoder" and config["calm_dist"]["autoencoder"]["mask_token_id"] == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == corpus["tokenizer"].read_bytes()


def test_a_save_that_kept_only_the_tied_output_copy_imports_too(corpus, tmp_path):
    """Whichever copy of the tied embedding a save kept is the one used."""
    src, state = reference_autoencoder(tmp_path / "ref", corpus, "bin")
    kept = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
    write_reference(tmp_path / "lm_head_only", ae_config(corpus), kept, "safetensors")
    assert convert("import-reference", tmp_path / "lm_head_only", tmp_path / "out") == 0
    weights = load_safetensors(tmp_path / "out" / "model.safetensors")
    assert torch.equal(weights["embed_tokens.weight"], state["encoder.embed_tokens.weight"])


@pytest.mark.parametrize("kv_heads, fmt", [(HEADS, "bin"), (2, "safetensors")], ids=["mha-bin", "gqa-safetensors"])
def test_a_reference_calm_imports_exactly(corpus, tmp_path, kv_heads, fmt):
    """Backbone states, head samples for fixed noise and the embedded autoencoder equal the
    reference's forward on its own tensors; the autoencoder comes from ae_model.* (or ae_path)."""
    src, state, ae_state = reference_calm(tmp_path / "ref", corpus, kv_heads, fmt)
    assert convert("import-reference", src, tmp_path / "out") == 0
    model = imported(tmp_path / "out")
    tokens = torch.randint(0, corpus["vocab"], (2, 5 * K), generator=torch.Generator().manual_seed(1))
    noise = torch.rand(3, 2, 5, NOISE, generator=torch.Generator().manual_seed(2)) - 0.5
    with torch.no_grad():
        h = model.hidden_states(tokens)
        torch.testing.assert_close(h, ref_backbone(state, tokens, kv_heads), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.head(h, noise), ref_head(state, h, noise), rtol=1e-4, atol=1e-5)
        chunks = tokens.reshape(2, 5, K)
        torch.testing.assert_close(model.autoencoder.encode(chunks)[0], ref_encode(ae_state, chunks)[0],
                                   rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "calm" and config["ae_path"] is None  # the autoencoder is embedded
    assert config["num_key_value_heads"] == kv_heads


def test_calm_eval_and_generate_run_on_an_imported_directory(corpus, tmp_path, capsys):
    from calm_dist.cli.eval import main as eval_main
    from calm_dist.cli.generate import main as generate_main

    src, _, _ = reference_calm(tmp_path / "ref", corpus, 2)
    assert convert("import-reference", src, tmp_path / "out") == 0
    assert eval_main([str(tmp_path / "out"), "--data", corpus["valid"], "--max-blocks", "2",
                      "--out", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert "brierlm" in json.dumps(report).lower()
    assert generate_main([str(tmp_path / "out"), "--prompt", "The state of the Union", "--max-new-tokens", "8",
                          "--ignore-eos", "--out", str(tmp_path / "gen.jsonl")]) == 0
    assert json.loads((tmp_path / "gen.jsonl").read_text().splitlines()[0])["tokens_generated"] == 8


# -- export and the round trip -----------------------------------------------------------------------------
def test_export_then_import_gives_the_same_directory_bit_for_bit(corpus, tmp_path):
    """import(export(x)) == x for CALM (GQA) and the autoencoder; the exported files are what the
    reference reads: model_type energy/autoencoder, ae_path to an autoencoder written beside it,
    .bin files of plain tensors with both names of the tied and twice-registered tensors."""
    src, state, _ = reference_calm(tmp_path / "ref", corpus, 2)
    assert convert("import-reference", src, tmp_path / "first") == 0
    assert convert("export-reference", tmp_path / "first", tmp_path / "exported") == 0
    exported = tmp_path / "exported"
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "energy" and Path(config["ae_path"]) == (exported / "autoencoder").resolve()
    assert json.loads((exported / "autoencoder" / "config.json").read_text())["model_type"] == "autoencoder"
    tensors = torch.load(exported / "pytorch_model.bin", weights_only=True)
    assert set(tensors) == set(state)  # every reference name, the duplicated head's and the AE's included
    assert all(torch.equal(tensors[k], state[k]) for k in state)
    ae_tensors = torch.load(exported / "autoencoder" / "pytorch_model.bin", weights_only=True)
    assert torch.equal(ae_tensors["decoder.lm_head_weight"], ae_tensors["encoder.embed_tokens.weight"])
    assert convert("import-reference", exported, tmp_path / "second") == 0
    first, second = (load_safetensors(tmp_path / d / "model.safetensors") for d in ("first", "second"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    ae_src, _ = reference_autoencoder(tmp_path / "ae_ref", corpus, "bin")
    assert convert("import-reference", ae_src, tmp_path / "ae_first") == 0
    assert convert("export-reference", tmp_path / "ae_first", tmp_path / "ae_exported", "--weights", "safetensors") == 0
    assert convert("import-reference", tmp_path / "ae_exported", tmp_path / "ae_second") == 0
    a, b = (load_safetensors(tmp_path / d / "model.safetensors") for d in ("ae_first", "ae_second"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_weights_takes_a_reference_directory(corpus, tmp_path):
    """training.init_weights accepts the reference's CALM directory as it is (imported on the fly)."""
    from calm_dist.engines.initial_weights import read_weights

    src, _, _ = reference_calm(tmp_path / "ref", corpus, HEADS)
    assert convert("import-reference", src, tmp_path / "out") == 0
    on_the_fly, imported_weights = read_weights(src), read_weights(tmp_path / "out")
    assert on_the_fly.keys() == imported_weights.keys() and len(on_the_fly) > 0
    assert all(torch.equal(on_the_fly[k], imported_weights[k]) for k in on_the_fly)


@pytest.mark.slow
def test_continued_pretraining_from_a_reference_calm_in_the_3d_regime(corpus, tmp_path):
    """calm-train with training.init_weights AND training.autoencoder_path both the reference's CALM
    directory (imported on the fly), TP = 2 (each rank takes its shard): the losses equal a
    one-process run from the imported directories."""
    from calm_dist.training.golden import run_losses
    from tests.train_utils import TINY, train

    src, _, _ = reference_calm(tmp_path / "ref", corpus, 2)
    assert convert("import-reference", src, tmp_path / "calm") == 0
    assert convert("import-reference", tmp_path / "ref" / "ae", tmp_path / "ae") == 0
    shape = [*TINY, "model.num_query_groups=2", f"model.latent_size={LATENT}", f"autoencoder.latent_size={LATENT}",
             f"model.noise_size={NOISE}", f"model.num_mlp_layers={BLOCKS}", f"autoencoder.hidden_size={AE_D}",
             f"autoencoder.intermediate_size={AE_FFN}", "training.train_steps=3", "training.eval_steps=0",
             "optimizer.warmup_steps=0"]
    sharded_run = train(corpus["overrides"], "tiny_calm", tmp_path / "sharded", *shape, f"training.init_weights={src}",
                        f"training.autoencoder_path={src}", "parallel.regime=3d", "parallel.tensor_parallel=2",
                        "parallel.zero_stage=0", nproc=2)
    one_run = train(corpus["overrides"], "tiny_calm", tmp_path / "one", *shape,
                    f"training.init_weights={tmp_path / 'calm'}", f"training.autoencoder_path={tmp_path / 'ae'}", nproc=1)
    assert f"tensors from {src} (the reference implementation's format, imported on the fly)" in sharded_run.stderr
    assert f"tensors from {tmp_path / 'calm'}" in one_run.stderr
    sharded, one = run_losses(tmp_path / "sharded"), run_losses(tmp_path / "one")
    assert sorted(sharded) == sorted(one) == [1, 2, 3]
    assert [sharded[s] for s in (1, 2, 3)] == pytest.approx([one[s] for s in (1, 2, 3)], rel=2e-5, abs=1e-6)


# -- bad input: one line, exit 2, nothing written ---------------------------------------------------------------
class NotATensor:
    pass


def _refused(capsys, *argv) -> str:
    assert convert(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("calm-convert: error: "), err
    return err[0]


def test_reference_directories_that_do_not_fit_are_refused_naming_the_tensors(corpus, tmp_path, capsys):
    src, state = reference_autoencoder(tmp_path / "good", corpus, "bin")
    cases = {
        "missing": (lambda s: s.pop("encoder.squeeze_layer.bias"), "missing (1): encoder.squeeze_layer.bias"),
        "extra": (lambda s: s.__setitem__("encoder.surprise.weight", torch.zeros(2)), "unexpected (1): encoder.surprise.weight"),
        "shape": (lambda s: s.__setitem__("decoder.norm.weight", torch.ones(AE_D + 1)),
                  f"wrong shape (1): decoder.norm.weight ({AE_D + 1},) (expected ({AE_D},))"),
        "tied": (lambda s: s.__setitem__("decoder.lm_head_weight", s["encoder.embed_tokens.weight"] + 1),
                 "copies that differ (1): decoder.lm_head_weight != encoder.embed_tokens.weight"),
    }
    for name, (damage, expected) in cases.items():
        bad_state = dict(state)
        damage(bad_state)
        bad = write_reference(tmp_path / name, ae_config(corpus), bad_state, "bin")
        line = _refused(capsys, "import-reference", bad, tmp_path / f"out_{name}")
        assert expected in line, line
        assert not (tmp_path / f"out_{name}").exists()
    # A config whose sizes disagree with the tensors: every tensor of that size is named.
    bigger = write_reference(tmp_path / "sizes", {**ae_config(corpus), "hidden_size": AE_D * 2}, state, "bin")
    line = _refused(capsys, "import-reference", bigger, tmp_path / "out_sizes")
    assert "wrong shape" in line and "encoder.embed_tokens.weight" in line and not (tmp_path / "out_sizes").exists()


def test_bad_reference_input_gets_one_clear_line(corpus, tmp_path, capsys):
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "is not a reference model" in _refused(capsys, "import-reference", neither, tmp_path / "o1")

    pickled = write_reference(tmp_path / "pickled", ae_config(corpus), {}, "bin")
    with open(pickled / "pytorch_model.bin", "wb") as f:
        pickle.dump({"encoder.embed_tokens.weight": NotATensor()}, f, protocol=2)
    line = _refused(capsys, "import-reference", pickled, tmp_path / "o2")
    assert "refused by torch.load(weights_only=True)" in line

    from calm_dist.pretrained import load_pretrained

    with pytest.raises(ValueError, match="in the reference implementation's format: import it first"):
        load_pretrained(reference_autoencoder(tmp_path / "not_imported", corpus)[0])  # what calm-eval calls

    src, _, _ = reference_calm(tmp_path / "calm", corpus, HEADS)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "ae_path": str(tmp_path / "gone")}))
    line = _refused(capsys, "import-reference", src, tmp_path / "o3")
    assert "its autoencoder (ae_path" in line and "is missing" in line and "--autoencoder DIR" in line
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


@pytest.mark.slow
def test_a_calm_m_shaped_reference_directory_imports(corpus, tmp_path):
    """The paper's CALM-M shape (16 layers of width 1024, 16 heads, the energy head's 4 blocks, the
    512-wide autoencoder, Llama-3's 128,256 tokens + PAD), random weights in a .bin: imported with
    every check; the time and peak memory of the import are printed (run with -s)."""
    paper = {**corpus, "vocab": 128257, "pad": 128256, "bos": 128000, "eos": 128001, "tokenizer": None}
    src, state, _ = reference_calm(tmp_path / "ref", paper, 16, dims=CALM_M_DIMS, random=False)  # zeros: sizes only
    params = sum(t.numel() for name, t in state.items() if not name.startswith(("generative_head.", "ae_model.decoder.lm")))
    del state
    started = time.perf_counter()
    probe = ("import resource, sys; from calm_dist.convert.cli import main; rc = main(sys.argv[1:]); "
             "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", probe, "import-reference", str(src), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_gib = int(proc.stderr.split("peak_rss_kib")[1].split()[0]) / 2**20
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 128257 and config["num_hidden_layers"] == 16 and config["num_mlp_layers"] == 4
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys()) == params
    print(f"CALM-M-shaped import: {params / 1e6:.0f} M parameters ({params * 4 / 2**30:.2f} GiB in float32), "
          f"{seconds:.1f} s, peak RSS {peak_gib:.2f} GiB")
