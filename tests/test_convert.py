"""Checkpoint conversion end to end: tiny runs trained under real ZeRO-3 on 2 CPU ranks, converted
to config.json + safetensors + tokenizer, and checked against the checkpoint and DeepSpeed.

Three torchrun launches (the autoencoder, CALM on it, the token baseline), shared by every test of
the module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from calm_dist.convert import (
    ConversionError,
    VerificationError,
    convert_checkpoint,
    diff_checkpoints,
    inspect_checkpoint,
    load_converted,
    main,
    resolve_checkpoint,
)
from calm_dist.convert import export
from calm_dist.pretrained.loader import load_checkpoint_model
from calm_dist.convert.verify import model_outputs, probe_tokens
from tests.train_utils import prepared_corpus_overrides, train


def deepspeed_weights(run: Path, tag: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation (zero_to_fp32), the yardstick for ours."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)


def stored(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus_overrides(tmp_path_factory.mktemp("data"))


def _two_rank_run(tmp_path_factory, data, preset: str, steps: int, *overrides: str) -> Path:
    """A tiny `preset` trained on 2 ranks under ZeRO-3, checkpointed every 2 steps."""
    out = tmp_path_factory.mktemp(preset) / "run"
    train(data, preset, out, f"training.train_steps={steps}", "training.save_interval=2", "training.eval_steps=0",
          *overrides, nproc=2)
    return out


@pytest.fixture(scope="module")
def ae_run(data, tmp_path_factory):
    """Stage 1 on 2 ranks: checkpoints global_step2 and global_step4."""
    return _two_rank_run(tmp_path_factory, data, "tiny_autoencoder", 4)


@pytest.fixture(scope="module")
def calm_run(data, ae_run, tmp_path_factory):
    """Stage 2 on 2 ranks on the trained autoencoder: checkpoint global_step2."""
    return _two_rank_run(tmp_path_factory, data, "tiny_calm", 2, f"training.autoencoder_path={ae_run / 'autoencoder'}")


@pytest.fixture(scope="module")
def baseline_run(data, tmp_path_factory):
    return _two_rank_run(tmp_path_factory, data, "tiny_baseline", 2)


@pytest.fixture(scope="module")
def ae_converted(ae_run, tmp_path_factory):
    return convert_checkpoint(ae_run, tmp_path_factory.mktemp("export") / "ae")  # verified


@pytest.fixture(scope="module")
def calm_converted(calm_run, tmp_path_factory):
    return convert_checkpoint(calm_run, tmp_path_factory.mktemp("export") / "calm")  # embedded, verified


def _same_outputs(left, right, seed: int = 7) -> None:
    tokens = probe_tokens(left.config, seed=seed)
    a, b = model_outputs(left, tokens, seed=seed), model_outputs(right, tokens, seed=seed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_autoencoder_converts_to_the_same_weights_and_outputs(ae_run, ae_converted, data):
    config = json.loads((ae_converted / "config.json").read_text())
    assert config["model_type"] == "calm_autoencoder" and config["torch_dtype"] == "float32"
    assert (config["patch_size"], config["hidden_size"], config["num_encoder_layers"]) == (4, 64, 2)
    assert config["source"]["tag"] == "global_step4" and config["source"]["step"] == 4
    assert config["calm_dist"]["training"]["stage"] == "autoencoder"
    tokenizer_file = Path(next(o for o in data if o.startswith("data.tokenizer=")).split("=", 1)[1])
    assert (ae_converted / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()

    reference, ours = deepspeed_weights(ae_run, "global_step4"), stored(ae_converted)
    assert reference.keys() == ours.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, ours[name]), name

    _same_outputs(load_checkpoint_model(resolve_checkpoint(ae_run)), load_converted(ae_converted))
    # A converted autoencoder also serves as stage 2's training.autoencoder_path.
    from calm_dist.models.autoencoder_io import load_autoencoder

    loaded = load_autoencoder(ae_converted).state_dict()
    assert all(torch.equal(loaded[n], t) for n, t in reference.items())


def test_calm_converts_with_the_autoencoder_embedded(calm_run, calm_converted):
    config = json.loads((calm_converted / "config.json").read_text())
    assert config["model_type"] == "calm" and config["ae_path"] is None
    for field in ("patch_size", "latent_size", "num_samples", "beta", "num_mlp_layers", "noise_size",
                  "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads"):
        assert field in config, field
    assert config["num_hidden_layers"] == 2 and config["autoencoder_config"]["hidden_size"] == 64

    reference, ours = deepspeed_weights(calm_run, "global_step2"), stored(calm_converted)
    assert reference.keys() == ours.keys() and any(n.startswith("autoencoder.") for n in ours)
    for name, tensor in reference.items():
        assert torch.equal(tensor, ours[name]), name

    from calm_dist.pretrained import load_pretrained

    checkpoint_model = load_checkpoint_model(resolve_checkpoint(calm_run))
    converted = load_pretrained(calm_converted)  # dispatches to load_converted
    assert converted.kind == "calm" and converted.tokenizer is not None
    _same_outputs(checkpoint_model, converted)  # energy loss and sampled chunks at a fixed seed
    # The seed reaches the head's noise (a barely trained head may still decode both to one chunk,
    # so compare the sampled latents themselves).
    h = torch.randn(3, converted.config.model.hidden_size)
    latents = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        latents.append(converted.model.sample_latents(h, 4))
    assert not torch.equal(*latents), "sampled latents should depend on the seed"


def test_calm_in_bfloat16_with_a_referenced_autoencoder(calm_run, tmp_path):
    out = convert_checkpoint(calm_run, tmp_path / "calm-bf16", dtype="bfloat16", embed_autoencoder=False)
    config = json.loads((out / "config.json").read_text())
    assert config["ae_path"] == "autoencoder" and config["torch_dtype"] == "bfloat16"
    reference, ours = deepspeed_weights(calm_run, "global_step2"), stored(out)
    autoencoder = load_file(str(out / "autoencoder" / "model.safetensors"))
    assert not any(n.startswith("autoencoder.") for n in ours)
    assert {f"autoencoder.{n}" for n in autoencoder} | ours.keys() == reference.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    for name, tensor in autoencoder.items():  # as stage 1 writes it: float32, exact
        assert torch.equal(tensor, reference[f"autoencoder.{name}"]), name

    tokens = probe_tokens(load_converted(out).config)
    exact = model_outputs(load_checkpoint_model(resolve_checkpoint(calm_run)), tokens)["loss"]
    rounded = model_outputs(load_converted(out), tokens)["loss"]
    assert abs(exact - rounded) <= 5e-2 * max(1.0, abs(exact)), (exact, rounded)


def test_baseline_converts_in_float32_and_float16(baseline_run, tmp_path, capsys):
    out = convert_checkpoint(baseline_run, tmp_path / "baseline")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "transformer" and config["num_hidden_layers"] == 2
    reference, ours = deepspeed_weights(baseline_run, "global_step2"), stored(out)
    assert reference.keys() == ours.keys()
    assert all(torch.equal(tensor, ours[name]) for name, tensor in reference.items())
    _same_outputs(load_checkpoint_model(resolve_checkpoint(baseline_run)), load_converted(out))  # CE and logits

    half = tmp_path / "baseline-fp16"
    capsys.readouterr()  # drop what DeepSpeed printed above
    assert main(["convert", str(baseline_run), str(half), "--dtype", "float16"]) == 0  # verified
    assert capsys.readouterr().out.strip() == str(half)
    ours = stored(half)
    assert all(torch.equal(ours[name], tensor.half()) for name, tensor in reference.items())


def test_inspect_and_diff(ae_run, calm_run, ae_converted, calm_converted, capsys):
    info = inspect_checkpoint(calm_run)
    assert (info["format"], info["stage"], info["tag"], info["step"]) == ("checkpoint", "calm", "global_step2", 2)
    params = info["parameters"]
    assert params["total"] == sum(t.numel() for t in deepspeed_weights(calm_run, "global_step2").values())
    assert params["frozen"] == params["by_module"]["autoencoder"] > 0
    assert params["trainable"] == params["total"] - params["frozen"]
    assert info["config"]["patch_size"] == 4 and "calm_dist" not in info["config"]
    converted = inspect_checkpoint(calm_converted)  # from safetensors headers
    assert converted["parameters"] == params
    assert {n: t["shape"] for n, t in converted["tensors"].items()} == {n: t["shape"] for n, t in info["tensors"].items()}

    same = diff_checkpoints(ae_run, ae_run)
    assert same["identical"] and not same["config"] and not same["differing_tensors"]
    steps = diff_checkpoints(ae_run / "checkpoints" / "global_step2", ae_run)
    assert not steps["identical"] and steps["differing_tensors"] and not steps["config"]
    assert diff_checkpoints(calm_converted, calm_run)["identical"]  # the export is the checkpoint
    kinds = diff_checkpoints(ae_converted, calm_converted)
    assert kinds["config"]["training.stage"] == ["autoencoder", "calm"] and kinds["only_in_b"]

    assert main(["inspect", str(calm_converted)]) == 0
    assert "trainable" in capsys.readouterr().out
    assert main(["diff", str(ae_run), str(ae_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["identical"] is True


def _copy_checkpoints(run: Path, target: Path, tags: list[str], latest: str | None) -> Path:
    target.mkdir(parents=True)
    for tag in tags:
        shutil.copytree(run / "checkpoints" / tag, target / tag)
    if latest:
        (target / "latest").write_text(latest)
    return target


def test_bad_input_gives_clear_errors(ae_run, ae_converted, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="is not a checkpoint"):
        convert_checkpoint(tmp_path / "empty", tmp_path / "out")
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a checkpoint" in err and "Traceback" not in err

    no_latest = _copy_checkpoints(ae_run, tmp_path / "no-latest", ["global_step2", "global_step4"], latest=None)
    with pytest.raises(ConversionError, match="no 'latest'.*available: global_step2, global_step4"):
        convert_checkpoint(no_latest, tmp_path / "out")
    with pytest.raises(ConversionError, match="'global_step9'.*available: global_step2, global_step4"):
        convert_checkpoint(ae_run, tmp_path / "out", tag="global_step9")

    truncated = _copy_checkpoints(ae_run, tmp_path / "truncated", ["global_step4"], latest="global_step4")
    shard = truncated / "global_step4" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    whole = shard.stat().st_size
    os.truncate(shard, whole // 2)
    with pytest.raises(ConversionError, match=f"{shard} has {whole // 2} bytes, the manifest says {whole}: truncated"):
        convert_checkpoint(truncated, tmp_path / "out")
    lost = _copy_checkpoints(ae_run, tmp_path / "lost", ["global_step4"], latest="global_step4")
    optim = lost / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optim.unlink()
    with pytest.raises(ConversionError, match=f"{optim} is missing \\(the manifest lists it\\)"):
        convert_checkpoint(lost, tmp_path / "out")
    # A checkpoint from before manifests: the structural checks still name the file.
    for copy in (truncated, lost):
        (copy / "global_step4" / "manifest.json").unlink()
        meta_file = copy / "global_step4" / "meta.json"
        meta = json.loads(meta_file.read_text())
        del meta["manifest"]
        meta_file.write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match=f"shard {shard} is truncated"):
        convert_checkpoint(truncated, tmp_path / "out")
    with pytest.raises(ConversionError, match="written by 2 ranks but holds 1"):
        convert_checkpoint(lost, tmp_path / "out")

    with pytest.raises(ConversionError, match="missing.json"):
        convert_checkpoint(ae_run, tmp_path / "out", tokenizer=tmp_path / "missing.json")
    with pytest.raises(ConversionError, match="already exists"):
        convert_checkpoint(ae_run, ae_converted)
    assert not (tmp_path / "out").exists()

    without = tmp_path / "no-tokenizer"
    shutil.copytree(ae_converted, without)
    (without / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer.json"):
        load_converted(without)
    assert load_converted(without, allow_missing_tokenizer=True).tokenizer is None


def test_failed_verification_leaves_no_output(ae_run, tmp_path, monkeypatch, capsys):
    """A conversion whose weights come out wrong (one value changed in the written file) is caught by
    verification, and nothing appears under the output name."""
    write = export.write_weights

    def write_then_corrupt(ref, cfg, out, dtype, embed):
        ae_path = write(ref, cfg, out, dtype, embed)
        weights = stored(out)
        weights["latent_head.bias"][0] += 0.5
        save_file(weights, str(out / "model.safetensors"))
        return ae_path

    monkeypatch.setattr(export, "write_weights", write_then_corrupt)
    with pytest.raises(VerificationError, match="mu"):
        convert_checkpoint(ae_run, tmp_path / "bad")
    assert main(["convert", str(ae_run), str(tmp_path / "bad")]) == 1
    assert "verification failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory

    with safe_open(str(ae_run / "autoencoder" / "model.safetensors"), framework="pt") as f:
        assert "latent_head.bias" in f.keys()  # the corrupted name is a real tensor


def test_a_trained_calm_converts_straight_to_the_reference_format_and_back(calm_run, calm_converted, tmp_path):
    """`convert --format reference` on a training run writes what import-reference reads back into
    the same weights as the calm-dist conversion, bit for bit; a token baseline has no reference form."""
    from calm_dist.convert.cli import main

    assert main(["convert", str(calm_run), str(tmp_path / "ref"), "--format", "reference"]) == 0
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert config["model_type"] == "energy" and (tmp_path / "ref" / "autoencoder" / "pytorch_model.bin").is_file()
    assert main(["import-reference", str(tmp_path / "ref"), str(tmp_path / "back")]) == 0
    back, ours = stored(tmp_path / "back"), stored(calm_converted)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
