"""Per-module optimizer settings: `optimizer.lr_multipliers`, `weight_decay_multipliers` and
`lr_delay_steps` per module group (calm_dist/module_groups.py), in the config, the parameter groups
of both engines, the per-group LR schedule and checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from calm_dist.config import ConfigError, config_from_dict, config_to_dict, load_config, save_config, validate
from calm_dist.models.autoencoder import Autoencoder
from calm_dist.module_groups import module_group
from calm_dist.optim import param_groups
from calm_dist.parallel.state import ParallelLayout, ensure_model_parallel
from calm_dist.engines.optimizer import lr_scheduler

SHAPE = [
    "model.vocab_size=97", "model.pad_token_id=96", "model.bos_token_id=0", "model.eos_token_id=0",
    "model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=172", "model.num_attention_heads=4",
    "model.latent_size=32", "model.num_target_samples=4", "model.attention_backend=sdpa", "data.seq_length=16",
    "autoencoder.hidden_size=32", "autoencoder.intermediate_size=80", "autoencoder.latent_size=32",
]  # fmt: skip
HEAD_FIRST = "optimizer.lr_delay_steps={backbone: 3, compressor: 3, embeddings: 3}"


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    ensure_model_parallel()


def _cfg(preset: str = "tiny_calm", *overrides: str, world_size: int = 1):
    return validate(load_config([preset], [*SHAPE, *overrides]), world_size=world_size)


def _model(cfg):
    from calm_dist.models.baseline import TokenBaseline
    from calm_dist.models.calm import CALM

    torch.manual_seed(0)
    if cfg.training.stage == "calm":
        return CALM(cfg.model, Autoencoder(cfg.autoencoder))
    if cfg.training.stage == "baseline":
        return TokenBaseline(cfg.model)
    return Autoencoder(cfg.autoencoder)


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


# ---- config ------------------------------------------------------------------------------------


def test_cli_entry_overrides_merge_and_mapping_overrides_replace():
    cfg = _cfg("tiny_calm", "optimizer.lr_multipliers={head: 2, backbone: 0.5}",
               "optimizer.lr_multipliers.backbone=0.1", "optimizer.lr_delay_steps.embeddings=7")
    assert cfg.optimizer.lr_multipliers == {"head": 2.0, "backbone": 0.1}
    assert all(type(v) is float for v in cfg.optimizer.lr_multipliers.values())
    assert cfg.optimizer.lr_delay_steps == {"embeddings": 7}
    replaced = _cfg("tiny_calm", "optimizer.lr_multipliers.head=2", "optimizer.lr_multipliers={backbone: 0.1}")
    assert replaced.optimizer.lr_multipliers == {"backbone": 0.1}
    assert _cfg().optimizer.lr_multipliers == {} and _cfg().optimizer.lr_delay_steps == {}


def test_yaml_mappings_and_round_trips(tmp_path):
    path = tmp_path / "head_first.yaml"
    path.write_text("base: [tiny_calm]\noptimizer:\n  lr_multipliers: {backbone: 0.1}\n"
                    "  weight_decay_multipliers:\n    head: 0\n  lr_delay_steps: {backbone: 200}\n")
    cfg = validate(load_config([str(path)], SHAPE))
    opt = cfg.optimizer
    assert (opt.lr_multipliers, opt.weight_decay_multipliers, opt.lr_delay_steps) == (
        {"backbone": 0.1}, {"head": 0.0}, {"backbone": 200})
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg  # meta.json's way
    assert validate(load_config([str(save_config(cfg, tmp_path / "saved.yaml"))])) == cfg


@pytest.mark.parametrize(("preset", "override", "message"), [
    ("tiny_calm", "optimizer.lr_multipliers.trunk=0.1",
     "optimizer.lr_multipliers.trunk: unknown module group for training.stage calm; "
     "known: backbone, compressor, embeddings, head"),
    ("tiny_calm", "optimizer.lr_multipliers.backbone=-0.1", "optimizer.lr_multipliers.backbone must be >= 0"),
    ("tiny_calm", "optimizer.weight_decay_multipliers={head: -1}", "optimizer.weight_decay_multipliers.head must be >= 0"),
    ("tiny_calm", "optimizer.lr_delay_steps.backbone=-5", "optimizer.lr_delay_steps.backbone must be >= 0"),
    ("tiny_baseline", "optimizer.lr_delay_steps.compressor=5",
     "optimizer.lr_delay_steps.compressor: unknown module group for training.stage baseline; "
     "known: backbone, embeddings, head"),
    ("tiny_autoencoder", "optimizer.lr_multipliers.backbone=0.1", "known: autoencoder"),
])  # fmt: skip
def test_bad_settings_name_the_key(preset, override, message):
    with pytest.raises(ConfigError) as err:
        _cfg(preset, override)
    assert message in str(err.value)


@pytest.mark.parametrize(("override", "message"), [
    ("optimizer.lr_delay_steps.backbone=1.5", "optimizer.lr_delay_steps.backbone expects int"),
    ("optimizer.lr_multipliers=0.1", "optimizer.lr_multipliers expects a mapping"),
    ("optimizer.lr.backbone=0.1", "optimizer.lr is not a mapping"),
])
def test_bad_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["tiny_calm"], [override])


# ---- parameter groups --------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny_calm", "tiny_baseline", "tiny_autoencoder"])
def test_every_trainable_parameter_is_in_exactly_one_group(preset):
    cfg = _cfg(preset)
    model = _model(cfg)
    groups = param_groups(model, cfg)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)) and set(grouped) == set(trainable)
    expected = {"tiny_calm": ["embeddings.decay", "compressor.decay", "compressor.no_decay", "backbone.decay",
                              "backbone.no_decay", "head.decay", "head.no_decay"],
                "tiny_baseline": ["embeddings.decay", "backbone.decay", "backbone.no_decay", "head.decay"],
                "tiny_autoencoder": ["autoencoder.decay", "autoencoder.no_decay"]}[preset]  # fmt: skip
    assert [g["name"] for g in groups] == expected  # a fixed order: checkpoints load into it
    if preset != "tiny_autoencoder":
        named = dict(model.named_parameters())
        owner = {id(p): g["module_group"] for g in groups for p in g["params"]}
        assert owner[id(model.embed_tokens.weight)] == "embeddings"
        assert all(owner[id(p)] == "backbone" for p in model.backbone.parameters())
        head = model.head if preset == "tiny_calm" else model.lm_head
        assert all(owner[id(p)] == "head" for p in head.parameters())
        assert any("final_layernorm" in n and owner[id(p)] == "backbone" for n, p in named.items())


def test_multipliers_set_lr_and_decay_and_1d_parameters_never_decay():
    cfg = _cfg("tiny_calm", "optimizer.lr_multipliers={backbone: 0.1, head: 2}",
               "optimizer.weight_decay_multipliers={head: 0.5, embeddings: 0}")
    opt = cfg.optimizer
    groups = _by_name(param_groups(_model(cfg), cfg))
    assert groups["backbone.decay"]["lr"] == groups["backbone.no_decay"]["lr"] == 0.1 * opt.lr
    assert groups["head.decay"]["lr"] == 2 * opt.lr and groups["compressor.decay"]["lr"] == opt.lr
    assert groups["head.decay"]["weight_decay"] == 0.5 * opt.weight_decay
    assert groups["embeddings.decay"]["weight_decay"] == 0.0
    assert groups["backbone.decay"]["weight_decay"] == opt.weight_decay
    for name, group in groups.items():
        one_d = all(p.dim() == 1 for p in group["params"])
        assert one_d == name.endswith(".no_decay")
        if one_d:
            assert group["weight_decay"] == 0.0


def test_a_parameter_of_no_module_group_is_an_error():
    cfg = _cfg("tiny_baseline")
    model = _model(cfg)
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="'extra.weight' belongs to no module group"):
        param_groups(model, cfg)
    with pytest.raises(ValueError, match="no module group"):
        module_group("compressor.fc1.weight", "baseline")  # CALM-only part in the baseline


def test_3d_chunk_names_map_like_the_whole_model():
    """Pipeline chunks (a ModuleList of them under virtual stages: "<chunk>.<name>"), megatron's
    layer names and the vocabulary-split tables of TP > 1 land in the same groups."""
    from calm_dist.models.backbone import BackboneOptions
    from calm_dist.models.calm import CALM
    from calm_dist.models.kinds import model_kind
    from calm_dist.parallel.pipeline import strip_to_stage
    from calm_dist.parallel.vocab_parallel import VocabParallelEmbedding, VocabParallelOutput, parallelize_vocabulary
    from calm_dist.engines.model_build import build_model

    for preset in ("tiny_calm", "tiny_baseline"):
        cfg = _cfg(preset)
        whole_model = _model(cfg)
        whole = _by_name(param_groups(whole_model, cfg))
        layout = ParallelLayout(tensor_parallel=2, tp_rank=1)
        chunks = []
        for first, last in ((True, False), (False, True)):
            options = BackboneOptions(pre_process=first, post_process=last)
            if preset == "tiny_calm":  # build_model would load a trained autoencoder
                model = CALM(cfg.model, Autoencoder(cfg.autoencoder), backbone_options=options)
            else:
                model = build_model(cfg, backbone_options=options)
            kind = model_kind(cfg.training.stage)
            chunks.append(parallelize_vocabulary(strip_to_stage(model, kind, first, last), layout, first, last))
        assert isinstance(chunks[0].embed_tokens, VocabParallelEmbedding)
        assert preset == "tiny_calm" or isinstance(chunks[1].lm_head, VocabParallelOutput)
        chunked = nn.ModuleList(chunks)
        groups = _by_name(param_groups(chunked, cfg))
        assert list(groups) == list(whole) and all(g["lr"] == whole[n]["lr"] for n, g in groups.items())
        # Each chunk parameter is in the group of the whole model's parameter of the same name.
        whole_group = {n: g["module_group"] for g in whole.values() for n in _names(whole_model, g["params"])}
        chunk_group = {n: g["module_group"] for g in groups.values() for n in _names(chunked, g["params"])}
        assert len(chunk_group) == sum(1 for p in chunked.parameters() if p.requires_grad)
        assert {n.split(".", 1)[0] for n in chunk_group} == {"0", "1"}
        for name, group in chunk_group.items():
            assert whole_group[name.split(".", 1)[1]] == group, name


def _names(model: nn.Module, params: list) -> list[str]:
    ids = {id(p) for p in params}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def test_single_process_3d_engine_uses_the_same_groups(tmp_path):
    from calm_dist.models.autoencoder_io import save_autoencoder
    from calm_dist.parallel.state import current_layout
    from calm_dist.engines.megatron_3d import build_3d_engine
    from calm_dist.engines.optimizer import build_optimizer
    from calm_dist.engines.model_build import build_model

    ae_cfg = _cfg().autoencoder
    save_autoencoder(Autoencoder(ae_cfg).state_dict(), ae_cfg, tmp_path / "ae")
    common = [f"training.autoencoder_path={tmp_path / 'ae'}", "optimizer.lr_multipliers.backbone=0.1", HEAD_FIRST]
    engine = build_3d_engine(_cfg("tiny_calm", *common, "parallel.regime=3d", "parallel.zero_stage=1"),
                             current_layout(), torch.device("cpu"))
    zero3_cfg = _cfg("tiny_calm", *common)
    optimizer, _ = build_optimizer(build_model(zero3_cfg), zero3_cfg)

    def summary(groups):
        return [(g["name"], g["lr"], g["weight_decay"], sum(p.numel() for p in g["params"])) for g in groups]

    assert summary(engine.optimizer.param_groups) == summary(optimizer.param_groups)
    lrs = dict(zip((g["name"] for g in engine.optimizer.param_groups), engine.get_lr()))
    assert lrs["backbone.decay"] == 0.0 and lrs["head.decay"] > 0  # the delay, in the 3d schedule too


# ---- the per-group schedule ---------------------------------------------------------------------


def test_delayed_groups_stay_bit_identical_then_train():
    delay, warmup = 3, 2
    cfg = _cfg("tiny_calm", HEAD_FIRST, f"optimizer.warmup_steps={warmup}", "optimizer.lr=1e-2",
               "optimizer.lr_multipliers.backbone=0.5", "training.train_steps=20")
    model = _model(cfg)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optimizer.lr, betas=(0.9, 0.95))
    scheduler = lr_scheduler(optimizer, cfg)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tokens = torch.randint(1, 95, (2, cfg.derived.block_tokens), generator=torch.Generator().manual_seed(3))

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(tokens).loss.backward()
        optimizer.step()
        scheduler.step()

    def moved(prefix):
        return {n: not torch.equal(p, initial[n]) for n, p in model.named_parameters() if n.startswith(prefix)}

    for _ in range(delay):
        step()
        assert not any(moved("backbone.").values()) and not any(moved("compressor.").values())
        assert not any(moved("embed_tokens.").values())
        assert moved("head.")["head.output.weight"]  # (behind the zero output layer the head has no gradient yet)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    assert all(optimizer.state[p]["exp_avg"].abs().sum() > 0 for p in model.backbone.parameters())  # moments gather
    lrs = lambda: {g["name"]: g["lr"] for g in optimizer.param_groups}  # noqa: E731
    assert lrs()["backbone.decay"] == pytest.approx(0.5 * 1e-2 / warmup)  # the first warmup step
    step()
    assert all(moved("backbone.").values()) and all(moved("embed_tokens.").values())
    for _ in range(warmup - 1):
        step()
    assert lrs()["backbone.decay"] == pytest.approx(0.5 * 1e-2) and lrs()["head.decay"] == pytest.approx(1e-2)


def test_cosine_of_a_delayed_group_still_ends_at_min_lr():
    from calm_dist.engines.optimizer import lr_lambda

    cfg = _cfg("tiny_calm", "optimizer.schedule=cosine", "optimizer.min_lr=1e-4", "optimizer.lr=1e-3",
               "optimizer.warmup_steps=10", "training.train_steps=100")
    delayed, plain = lr_lambda(cfg, delay_steps=30), lr_lambda(cfg)
    assert [delayed(s) for s in (0, 29)] == [0.0, 0.0]
    assert delayed(30) == plain(0) and delayed(39) == plain(9) == 1.0
    assert delayed(100) == pytest.approx(0.1) == plain(100)


# ---- checkpoints ---------------------------------------------------------------------------------


def test_resumed_optimizer_state_loads_into_the_same_groups_and_meta_records_the_settings():
    from calm_dist.training.trainer import TrainState, checkpoint_meta

    cfg = _cfg("tiny_baseline", "optimizer.lr_multipliers.backbone=0.1", "optimizer.lr_delay_steps.head=5")
    model = _model(cfg)
    saved = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optimizer.lr)
    model(torch.randint(1, 95, (2, cfg.derived.block_tokens))).loss.backward()
    saved.step()
    other = _cfg("tiny_baseline", "optimizer.lr_multipliers.backbone=0.3")  # other values, same groups
    resumed = torch.optim.AdamW(param_groups(model, other), lr=cfg.optimizer.lr)
    resumed.load_state_dict(saved.state_dict())
    assert [g["name"] for g in resumed.param_groups] == [g["name"] for g in saved.param_groups]
    meta = json.loads(json.dumps(checkpoint_meta(cfg, TrainState(), None)))
    assert meta["config"]["optimizer"]["lr_multipliers"] == {"backbone": 0.1}
    assert meta["config"]["optimizer"]["lr_delay_steps"] == {"head": 5}


def test_a_checkpoint_from_before_module_groups_is_refused_clearly(tmp_path):
    from calm_dist.checkpoint.manager import CheckpointManager, CheckpointMismatch

    config = config_to_dict(_cfg())
    for key in ("lr_multipliers", "weight_decay_multipliers", "lr_delay_steps"):
        del config["optimizer"][key]  # what an older meta.json holds
    tag = tmp_path / "global_step4"
    tag.mkdir()
    (tag / "meta.json").write_text(json.dumps({"config": config, "step": 4, "world_size": 1}))
    torch.save({"data": {}}, tag / "rank_00000.pt")

    class NoEngine:  # the refusal comes before any engine state is touched
        def load_checkpoint(self, *args, **kwargs):
            raise AssertionError("must not be reached")

    manager = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1)
    with pytest.raises(CheckpointMismatch, match="training.load_optimizer=false"):
        manager.load(NoEngine(), "global_step4")
