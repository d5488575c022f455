"""Config loading, layering, overrides, validation rules, presets and the calm-config CLI."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import yaml

from calm_dist.config import (
    ConfigError,
    JobConfig,
    config_from_dict,
    config_to_dict,
    list_presets,
    load_config,
    save_config,
    validate,
)
from calm_dist.cli.config import main as cli_main

PAPER_PRESETS = {
    "autoencoder", "calm_m", "calm_l", "calm_xl", "transformer_s", "transformer_m", "transformer_l",
}
TINY_PRESETS = {"tiny_autoencoder", "tiny_calm", "tiny_baseline"}
RUN_PRESETS = {"quickstart_autoencoder", "quickstart_calm", "quickstart_baseline", "demo_autoencoder", "demo_calm",
               "demo_baseline"}


def write(path, text: str):
    path.write_text(textwrap.dedent(text))
    return path


def tiny(*overrides: str, world_size: int = 1, preset: str = "tiny_calm") -> JobConfig:
    return validate(load_config([preset], overrides), world_size=world_size)


# ---- presets -----------------------------------------------------------------------------------


def test_preset_list_holds_paper_and_tiny_presets_but_no_fragments():
    assert set(list_presets()) == PAPER_PRESETS | TINY_PRESETS | RUN_PRESETS
    assert all(not name.startswith("_") for name in list_presets())
    assert "_paper_common" in list_presets(include_fragments=True)


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS | TINY_PRESETS | RUN_PRESETS))
def test_every_preset_loads_and_validates(name):
    cfg = validate(load_config([name]))
    assert cfg.derived is not None
    assert cfg.derived.tokens_per_step == cfg.derived.global_batch_size * cfg.data.seq_length


def test_paper_presets_share_the_llama3_vocabulary():
    for name in PAPER_PRESETS:
        m = load_config([name]).model
        ids = (m.vocab_size, m.pad_token_id, m.bos_token_id, m.eos_token_id)
        assert ids == (128257, 128256, 128000, 128001)


def test_calm_m_matches_the_paper():
    cfg = validate(load_config(["calm_m"]))
    m, d = cfg.model, cfg.derived
    assert (m.num_layers, m.hidden_size, m.intermediate_size, m.num_attention_heads) == (16, 1024, 2752, 16)
    assert (m.patch_size, m.latent_size, m.noise_size) == (4, 128, 64)
    assert (m.num_samples, m.num_target_samples, m.beta) == (8, 100, 1.0)
    assert (m.num_mlp_layers, d.steps_per_block, d.block_tokens) == (4, 2048, 8196)  # head blocks: layers / 4
    assert cfg.optimizer.schedule == "constant" and cfg.optimizer.warmup_steps == 2000
    assert load_config(["calm_xl"]).model.num_attention_heads == 40


def test_autoencoder_preset_is_the_reference_autoencoder():
    cfg = validate(load_config(["autoencoder"]))
    ae = cfg.autoencoder
    assert (ae.hidden_size, ae.intermediate_size, ae.latent_size, ae.patch_size) == (512, 1280, 128, 4)
    assert (ae.token_dropout, ae.latent_dropout, ae.kl_weight, ae.kl_clamp) == (0.15, 0.15, 1e-3, 0.5)
    assert ae.vocab_size == 128257 and ae.mask_token_id == 128256  # resolved from the model
    assert cfg.training.stage == "autoencoder" and cfg.optimizer.warmup_steps == 1000


@pytest.mark.parametrize(
    "name, block_tokens, steps",
    [("tiny_calm", 260, 64), ("tiny_autoencoder", 256, 64), ("tiny_baseline", 257, 256)],
)
def test_tiny_presets_resolve_defaults(name, block_tokens, steps):
    cfg = tiny(preset=name)
    assert cfg.autoencoder.intermediate_size == 640  # 2.5 x hidden
    assert cfg.model.num_mlp_layers == 1
    assert cfg.model.num_query_groups == 4
    assert (cfg.derived.block_tokens, cfg.derived.steps_per_block) == (block_tokens, steps)
    assert cfg.training.precision == "fp32"


# ---- layering and overrides --------------------------------------------------------------------


def test_two_files_merge_key_by_key(tmp_path):
    a = write(tmp_path / "a.yaml", "model:\n  hidden_size: 512\n  num_layers: 3\ndata:\n  seq_length: 64\n")
    b = write(tmp_path / "b.yaml", "model:\n  num_layers: 5\n")
    cfg = load_config([a, b])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.data.seq_length) == (512, 5, 64)


def test_base_preset_and_relative_paths(tmp_path):
    (tmp_path / "common").mkdir()
    write(tmp_path / "common" / "site.yaml", "training:\n  output_dir: runs/site\n  micro_batch_size: 2\n")
    run = write(
        tmp_path / "run.yaml",
        """
        base: [tiny_calm, common/site.yaml]
        training:
          micro_batch_size: 3
        """,
    )
    cfg = load_config([run])
    assert cfg.model.hidden_size == 256  # from the preset
    assert cfg.training.output_dir == "runs/site"  # from the relative base
    assert cfg.training.micro_batch_size == 3  # the including file wins over its bases


def test_include_cycle_is_detected(tmp_path):
    write(tmp_path / "a.yaml", "base: [b.yaml]\n")
    write(tmp_path / "b.yaml", "base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config([tmp_path / "a.yaml"])


def test_overrides_are_parsed_and_typed():
    cfg = load_config(
        "tiny_calm",
        ["model.hidden_size=512", "optimizer.lr=1e-3", "training.precision=bf16",
         "logging.wandb=true", "data.tokenizer=1e-3", "model.beta=1"],
    )
    assert cfg.model.hidden_size == 512
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float)
    assert cfg.training.precision == "bf16" and cfg.logging.wandb is True
    assert cfg.data.tokenizer == "1e-3"  # string fields keep the text verbatim
    assert cfg.model.beta == 1.0 and isinstance(cfg.model.beta, float)  # int accepted for float


def test_later_override_wins_over_files_and_earlier_overrides():
    cfg = load_config(["tiny_calm"], ["model.num_layers=2", "model.num_layers=6"])
    assert cfg.model.num_layers == 6


@pytest.mark.parametrize("bad", ["model.hidden_size", "hidden_size=3", "=3", "model.=3"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(["tiny_calm"], [bad])


# ---- strict checking ---------------------------------------------------------------------------


def test_unknown_key_suggests_the_close_match():
    with pytest.raises(ConfigError) as e:
        load_config(["tiny_calm"], ["model.hiden_size=3"])
    assert "model.hiden_size" in str(e.value) and "Did you mean 'model.hidden_size'" in str(e.value)
    assert "num_attention_heads" in str(e.value)  # lists the allowed keys


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path / "x.yaml", "optimizer:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config([path])
    assert "x.yaml" in str(e.value) and "optimizer.learning_rate" in str(e.value)


def test_unknown_section_suggests_the_close_match():
    with pytest.raises(ConfigError, match="'trainig'.*Did you mean 'training'"):
        load_config([], ["trainig.seed=1"])


def test_derived_cannot_be_set(tmp_path):
    with pytest.raises(ConfigError, match="derived"):
        load_config([], ["derived.world_size=4"])
    with pytest.raises(ConfigError, match="derived"):
        load_config([write(tmp_path / "d.yaml", "derived:\n  world_size: 4\n")])


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "model:\n  hidden_size: 512\n   num_layers: : 3\n")
    with pytest.raises(ConfigError) as e:
        load_config([path])
    assert "broken.yaml" in str(e.value) and "line 3" in str(e.value)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="mapping"):
        load_config([write(tmp_path / "top.yaml", text)])


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        load_config([write(tmp_path / "s.yaml", "model: 3\n")])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.hidden_size=big", "model.hidden_size expects int"),
        ("model.hidden_size=true", "model.hidden_size expects int, got bool"),  # bool is not an int
        ("model.hidden_size=512.0", "model.hidden_size expects int, got float"),
        ("optimizer.lr=false", "optimizer.lr expects float, got bool"),
        ("logging.wandb=1", "logging.wandb expects bool"),
        ("training.precision=fp16", "training.precision must be one of 'fp32', 'bf16'"),
    ],
)
def test_wrong_type_names_key_and_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config([], [override])


def test_wrong_type_in_a_file(tmp_path):
    path = write(tmp_path / "t.yaml", "data:\n  tokenizer: 12\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: data\.tokenizer expects str"):
        load_config([path])


def test_unknown_preset_suggests_the_close_match():
    with pytest.raises(ConfigError, match="Did you mean preset 'calm_m'"):
        load_config(["calm_n"])


# ---- validation rules --------------------------------------------------------------------------

REJECTED = [
    # (overrides, world_size, text the message must contain)
    (["data.seq_length=250"], 1, "data.seq_length"),
    (["model.patch_size=8"], 1, "autoencoder.patch_size"),
    (["model.latent_size=64"], 1, "model.latent_size"),
    (["autoencoder.vocab_size=100"], 1, "autoencoder.vocab_size"),
    (["model.pad_token_id=4097"], 1, "model.pad_token_id"),
    (["model.bos_token_id=-1"], 1, "model.bos_token_id"),
    (["model.pad_token_id=0"], 1, "model.pad_token_id"),
    (["model.patch_size=2", "autoencoder.patch_size=2"], 1, "model.patch_size"),
    (["model.eos_token_id=5000"], 1, "model.eos_token_id"),
    (["autoencoder.mask_token_id=4097"], 1, "autoencoder.mask_token_id"),
    (["model.hidden_size=250"], 1, "model.num_attention_heads"),
    (["model.num_query_groups=3"], 1, "model.num_query_groups"),
    (["model.hidden_size=12"], 1, "must be even for RoPE"),
    (["model.max_position_embeddings=32"], 1, "model.max_position_embeddings"),
    (["model.beta=2"], 1, "model.beta"),
    (["model.beta=0"], 1, "model.beta"),
    (["model.num_samples=1"], 1, "model.num_samples"),
    (["model.num_target_samples=0"], 1, "model.num_target_samples"),
    (["model.hidden_dropout=1.0"], 1, "model.hidden_dropout"),
    (["autoencoder.token_dropout=-0.1"], 1, "autoencoder.token_dropout"),
    (["autoencoder.latent_dropout=1"], 1, "autoencoder.latent_dropout"),
    (["autoencoder.kl_clamp=-0.5"], 1, "autoencoder.kl_clamp"),
    (["autoencoder.num_encoder_layers=3"], 1, "autoencoder.num_encoder_layers"),
    (["model.num_layers=0"], 1, "model.num_layers"),
    (["autoencoder.hidden_size=0"], 1, "autoencoder.hidden_size"),
    (["training.micro_batch_size=0"], 1, "training.micro_batch_size"),
    (["parallel.tensor_parallel=2"], 2, "parallel.regime=3d"),
    (["parallel.pipeline_parallel=2"], 2, "parallel.pipeline_parallel"),
    (["parallel.regime=3d", "parallel.pipeline_parallel=2", "parallel.zero_stage=2"], 2,
     "DeepSpeed cannot combine ZeRO-2/3 with pipeline"),
    (["parallel.regime=3d", "parallel.tensor_parallel=2", "parallel.zero_stage=3"], 2,
     "parallel.zero_stage <= 1"),
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
    (["parallel.regime=3d", "parallel.tensor_parallel=2", "parallel.zero_stage=1"], 3,
     "parallel.tensor_parallel"),
    (["parallel.regime=3d", "parallel.tensor_parallel=8", "parallel.zero_stage=1"], 8,
     "model.num_attention_heads"),
    (["parallel.zero_stage=4"], 1, "parallel.zero_stage"),
    (["training.global_batch_size=12"], 1, "training.global_batch_size"),
    (["training.global_batch_size=32", "training.gradient_accumulation_steps=3"], 1,
     "training.gradient_accumulation_steps"),
    (["optimizer.lr=0"], 1, "optimizer.lr"),
    (["optimizer.min_lr=1"], 1, "optimizer.min_lr"),
    (["optimizer.warmup_steps=-1"], 1, "optimizer.warmup_steps"),
    (["optimizer.beta1=1"], 1, "optimizer.beta1"),
    (["optimizer.beta2=-0.1"], 1, "optimizer.beta2"),
    (["optimizer.grad_clip=-1"], 1, "optimizer.grad_clip"),
]


@pytest.mark.parametrize(
    "overrides, world_size, expected", REJECTED, ids=[" ".join(o) for o, _, _ in REJECTED]
)
def test_validation_rejects(overrides, world_size, expected):
    cfg = load_config(["tiny_calm"], overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=world_size)
    assert expected in str(e.value)


def test_baseline_position_limit_counts_tokens():
    with pytest.raises(ConfigError, match="model.max_position_embeddings"):
        tiny("model.max_position_embeddings=128", preset="tiny_baseline")
    tiny("model.max_position_embeddings=64")  # CALM reads 256 / 4 = 64 chunks: fine


def test_baseline_ignores_autoencoder_agreement():
    tiny("model.latent_size=64", "data.seq_length=250", preset="tiny_baseline")


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        tiny("model.beta=3", "optimizer.lr=0")
    assert "model.beta" in str(e.value) and "optimizer.lr" in str(e.value)


def test_supported_3d_layout():
    cfg = tiny("parallel.regime=3d", "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2",
               "parallel.zero_stage=1", world_size=8)
    assert cfg.derived.data_parallel_size == 2


@pytest.mark.parametrize(
    "world, micro, global_batch, accum, dp, want_accum, want_global",
    [
        (1, 8, 0, 0, 1, 1, 8),
        (4, 8, 0, 2, 4, 2, 64),
        (8, 4, 256, 0, 8, 8, 256),
        (8, 4, 256, 8, 8, 8, 256),
        (2, 3, 12, 0, 2, 2, 12),
    ],
)
def test_batch_arithmetic(world, micro, global_batch, accum, dp, want_accum, want_global):
    cfg = tiny(f"training.micro_batch_size={micro}", f"training.global_batch_size={global_batch}",
               f"training.gradient_accumulation_steps={accum}", world_size=world)
    d = cfg.derived
    assert (d.world_size, d.data_parallel_size) == (world, dp)
    assert (d.gradient_accumulation_steps, d.global_batch_size) == (want_accum, want_global)
    tr = cfg.training
    assert (tr.gradient_accumulation_steps, tr.global_batch_size) == (want_accum, want_global)
    assert d.tokens_per_step == want_global * 256


def test_batch_arithmetic_with_model_parallel():
    cfg = tiny("parallel.regime=3d", "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2",
               "parallel.zero_stage=1", "training.micro_batch_size=2", "training.global_batch_size=64",
               world_size=16)
    assert (cfg.derived.data_parallel_size, cfg.derived.gradient_accumulation_steps) == (4, 8)


def test_validate_returns_a_copy_and_is_idempotent():
    raw = load_config(["tiny_calm"])
    cfg = validate(raw)
    assert raw.derived is None and raw.autoencoder.vocab_size == 0 and raw.model.num_mlp_layers == 1
    assert cfg is not raw and cfg.autoencoder.vocab_size == 4097 and cfg.autoencoder.mask_token_id == 4096
    assert validate(cfg) == cfg


def test_reference_mask_id_zero_is_kept():
    assert tiny("autoencoder.mask_token_id=0").autoencoder.mask_token_id == 0


# ---- serialisation -----------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path):
    raw = load_config(["calm_m"], ["optimizer.lr=1e-4", "model.rms_norm_eps=1e-5"])
    assert load_config([save_config(raw, tmp_path / "raw.yaml")]) == raw
    cfg = validate(raw, world_size=8)
    path = save_config(cfg, tmp_path / "sub" / "resolved.yaml")
    assert "tokens_per_step" in path.read_text()  # derived values recorded as a comment
    loaded = load_config([path])
    assert loaded == dataclasses.replace(cfg, derived=None)
    assert validate(loaded, world_size=8) == cfg
    assert sorted(p.name for p in path.parent.iterdir()) == ["resolved.yaml"]  # no temp file left


def test_dict_round_trip_keeps_derived():
    cfg = tiny()
    data = config_to_dict(cfg)
    assert data["derived"]["steps_per_block"] == 64
    assert config_from_dict(data) == cfg
    assert "derived" not in config_to_dict(load_config(["tiny_calm"]))


def test_config_from_dict_checks_keys():
    with pytest.raises(ConfigError, match="model.hidden"):
        config_from_dict({"model": {"hidden": 3}})


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_prints_validated_yaml(capsys):
    assert cli_main(["--config", "tiny_calm", "model.hidden_size=512", "--world-size", "2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["hidden_size"] == 512
    assert printed["derived"]["world_size"] == 2 and printed["derived"]["global_batch_size"] == 16


def test_cli_layers_two_configs(tmp_path, capsys):
    extra = write(tmp_path / "extra.yaml", "training:\n  seed: 7\n")
    assert cli_main(["-c", "tiny_baseline", "-c", str(extra)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["training"]["seed"] == 7


@pytest.mark.parametrize("argv, expected", [
    (["--config", "tiny_calm", "model.hiden_size=3"], "model.hidden_size"),
    (["--config", "tiny_calm", "model.beta=2"], "model.beta"),
])
def test_cli_exits_2_with_the_message(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert expected in captured.err and "Traceback" not in captured.err and captured.out == ""
