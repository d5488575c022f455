"""The one validation step: resolve defaults, derive batch arithmetic, reject illegal settings.

`validate()` returns a new `JobConfig` with every "0 / -1 means derived" default resolved and
`derived` filled. Problems are collected per phase and raised together as one `ConfigError`, each
line naming the dotted key(s) and the fix. Later phases divide by values the earlier ones check,
so a phase only runs when the one before it passed.
"""

from __future__ import annotations

import copy
import dataclasses
import re

from calm_dist.config import rules
from calm_dist.config.errors import ConfigError
from calm_dist.config.schema import DerivedConfig, JobConfig
from calm_dist.module_groups import MODULE_GROUPS


class _Problems:
    """Collects failed checks so a user sees every problem of a phase at once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def require(self, ok: bool, message: str) -> None:
        if not ok:
            self.lines.append(message)

    def raise_if_any(self) -> None:
        if len(self.lines) == 1:
            raise ConfigError(self.lines[0])
        if self.lines:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(self.lines))


def validate(cfg: JobConfig, world_size: int = 1) -> JobConfig:
    """Return a validated copy of `cfg` for `world_size` ranks; `cfg` itself is left unchanged."""
    cfg = copy.deepcopy(cfg)
    cfg.derived = None
    for phase in (_check_ranges, _check_stage, _check_model, _check_parallel, _check_module_groups):
        problems = _Problems()
        phase(cfg, world_size, problems)
        problems.raise_if_any()
    _resolve_defaults(cfg)
    return dataclasses.replace(cfg, derived=_derive(cfg, world_size))


# Single-field bounds, by dotted key.
_POSITIVE = (
    "model.vocab_size", "model.hidden_size", "model.intermediate_size", "model.num_layers",
    "model.num_attention_heads", "model.max_position_embeddings", "model.patch_size",
    "model.latent_size", "model.noise_size", "model.energy_chunk_positions", "model.rope_theta",
    "model.rms_norm_eps", "model.init_std", "autoencoder.patch_size", "autoencoder.latent_size",
    "autoencoder.hidden_size", "autoencoder.rms_norm_eps", "autoencoder.init_std", "data.seq_length",
    "training.micro_batch_size", "training.save_interval", "training.eval_interval",
    "training.keep_last", "training.collective_timeout_minutes", "logging.log_interval", "parallel.tensor_parallel",
    "parallel.pipeline_parallel", "parallel.virtual_pipeline_stages", "optimizer.lr", "optimizer.eps",
)
_NON_NEGATIVE = (
    "model.num_query_groups", "model.num_mlp_layers", "autoencoder.vocab_size",
    "autoencoder.intermediate_size", "autoencoder.kl_weight", "autoencoder.kl_clamp",
    "data.num_workers", "training.global_batch_size", "training.gradient_accumulation_steps",
    "training.train_steps", "training.eval_steps", "training.wall_clock_minutes",
    "training.max_bad_steps", "logging.peak_tflops", "optimizer.min_lr", "optimizer.warmup_steps",
    "optimizer.weight_decay", "optimizer.grad_clip", "data.shuffle_blocks",
)
_UNIT_INTERVAL = (  # [0, 1)
    "model.attention_dropout", "model.hidden_dropout", "autoencoder.token_dropout",
    "autoencoder.latent_dropout", "optimizer.beta1", "optimizer.beta2",
)


def _get(cfg: JobConfig, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def _check_ranges(cfg: JobConfig, world_size: int, p: _Problems) -> None:
    """Single-field bounds: sizes positive, probabilities and betas in range."""
    m, ae, opt = cfg.model, cfg.autoencoder, cfg.optimizer
    for key in _POSITIVE:
        p.require(_get(cfg, key) > 0, f"{key} must be > 0, got {_get(cfg, key)}")
    for key in _NON_NEGATIVE:
        p.require(_get(cfg, key) >= 0, f"{key} must be >= 0, got {_get(cfg, key)}")
    for key in _UNIT_INTERVAL:
        p.require(0 <= _get(cfg, key) < 1, f"{key} must be in [0, 1), got {_get(cfg, key)}")
    p.require(opt.min_lr <= opt.lr, f"optimizer.min_lr ({opt.min_lr}) must be <= optimizer.lr ({opt.lr})")
    p.require(0 < m.beta < 2, f"model.beta must be in (0, 2) for a strictly proper energy score "
                              f"(2 is only proper and collapses the head; CALM.md §5.2), got {m.beta}")
    p.require(m.num_samples >= 2, f"model.num_samples must be >= 2: the energy loss's diversity term "
                                  f"compares two head samples, got {m.num_samples}")
    p.require(m.num_target_samples >= 1, f"model.num_target_samples must be >= 1, got {m.num_target_samples}")
    for key, n in (("autoencoder.num_encoder_layers", ae.num_encoder_layers),
                   ("autoencoder.num_decoder_layers", ae.num_decoder_layers)):
        p.require(n >= 2 and n % 2 == 0, f"{key} must be even and >= 2 (half before, half after the "
                                         f"squeeze/expand; CALM.md §9.5), got {n}")
    p.require(cfg.parallel.activation_recompute in ("none", "selective", "full"),
              f"parallel.activation_recompute must be none, selective or full, got "
              f"{cfg.parallel.activation_recompute!r}")
    p.require(cfg.parallel.zero3_gather in ("layer", "block", "linear"),
              f"parallel.zero3_gather must be layer, block or linear, got {cfg.parallel.zero3_gather!r}")
    p.require(cfg.parallel.zero_stage in (0, 1, 2, 3),
              f"parallel.zero_stage must be 0, 1, 2 or 3, got {cfg.parallel.zero_stage}")
    p.require(world_size >= 1, f"world_size must be >= 1, got {world_size}")
    p.require(cfg.training.output_dir.strip() != "",
              "training.output_dir is empty: name the run's directory (checkpoints, logs and config go there)")
    p.require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.training.device) is not None,
              f"training.device must be auto, cpu or cuda[:N], got {cfg.training.device!r}")


def _check_module_groups(cfg: JobConfig, world_size: int, p: _Problems) -> None:
    """Per-module optimizer settings: names of this stage's module groups, values >= 0."""
    known = MODULE_GROUPS.get(cfg.training.stage, ())
    opt = cfg.optimizer
    for key in ("lr_multipliers", "weight_decay_multipliers", "lr_delay_steps"):
        for group, value in getattr(opt, key).items():
            dotted = f"optimizer.{key}.{group}"
            p.require(group in known, f"{dotted}: unknown module group for training.stage "
                                      f"{cfg.training.stage}; known: {', '.join(sorted(known))}")
            p.require(value >= 0, f"{dotted} must be >= 0, got {value}")


def _check_model(cfg: JobConfig, world_size: int, p: _Problems) -> None:
    """Attention shapes and special-token ids."""
    m, ae = cfg.model, cfg.autoencoder
    heads, groups = m.num_attention_heads, rules.query_groups(m)
    p.require(m.hidden_size % heads == 0, f"model.hidden_size ({m.hidden_size}) must be divisible by "
                                          f"model.num_attention_heads ({heads})")
    p.require(heads % groups == 0, f"model.num_attention_heads ({heads}) must be divisible by "
                                   f"model.num_query_groups ({groups})")
    p.require((m.hidden_size // heads) % 2 == 0, f"head dim model.hidden_size / model.num_attention_heads "
                                                 f"= {m.hidden_size // heads} must be even for RoPE")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(m, name)
        p.require(0 <= value < m.vocab_size, f"model.{name} ({value}) must be in [0, model.vocab_size "
                                             f"= {m.vocab_size})")
    p.require(m.pad_token_id not in (m.bos_token_id, m.eos_token_id),
              f"model.pad_token_id ({m.pad_token_id}) must differ from model.bos_token_id and "
              f"model.eos_token_id: PAD must never occur in real text (it is the autoencoder's mask id)")
    ae_vocab = ae.vocab_size or m.vocab_size
    mask = m.pad_token_id if ae.mask_token_id == -1 else ae.mask_token_id
    p.require(0 <= mask < ae_vocab, f"autoencoder.mask_token_id ({ae.mask_token_id}) must be -1 (the PAD "
                                    f"id) or in [0, autoencoder vocab = {ae_vocab})")


def _check_stage(cfg: JobConfig, world_size: int, p: _Problems) -> None:
    """Agreement between the language model, the autoencoder and the block length."""
    m, ae, seq, stage = cfg.model, cfg.autoencoder, cfg.data.seq_length, cfg.training.stage
    if stage in ("calm", "autoencoder"):
        p.require(seq % m.patch_size == 0, f"data.seq_length ({seq}) must be a multiple of "
                                           f"model.patch_size = K ({m.patch_size})")
        p.require(m.patch_size == ae.patch_size, f"model.patch_size ({m.patch_size}) must equal "
                                                 f"autoencoder.patch_size ({ae.patch_size})")
        p.require(m.latent_size == ae.latent_size, f"model.latent_size ({m.latent_size}) must equal "
                                                   f"autoencoder.latent_size ({ae.latent_size})")
        p.require(ae.vocab_size in (0, m.vocab_size),
                  f"autoencoder.vocab_size ({ae.vocab_size}) must be 0 or equal model.vocab_size "
                  f"({m.vocab_size}): both models share one tokenizer")
    if stage == "calm":
        p.require(m.patch_size >= 4,
                  f"model.patch_size = K ({m.patch_size}) below 4 is not supported yet: CALM's Brier-n for "
                  f"n > K needs autoregressive rollouts (CALM.md §3.2), which are not implemented")
    if stage != "autoencoder":
        steps = _steps_per_block(cfg)
        p.require(m.max_position_embeddings >= steps,
                  f"model.max_position_embeddings ({m.max_position_embeddings}) must be >= the {steps} "
                  f"steps the model reads per block (data.seq_length"
                  f"{' / model.patch_size' if stage == 'calm' else ''})")


def _check_parallel(cfg: JobConfig, world_size: int, p: _Problems) -> None:
    """The two supported regimes and the batch arithmetic."""
    par, tr, m = cfg.parallel, cfg.training, cfg.model
    tp, pp = par.tensor_parallel, par.pipeline_parallel
    if par.regime == "zero3":
        p.require(tp == 1 and pp == 1, f"parallel.regime zero3 requires parallel.tensor_parallel == "
                                       f"parallel.pipeline_parallel == 1 (got {tp}, {pp}); use "
                                       f"parallel.regime=3d for TP/PP")
    if pp > 1 and par.zero_stage >= 2:
        p.require(False, f"parallel.zero_stage {par.zero_stage} with parallel.pipeline_parallel {pp}: "
                         f"DeepSpeed cannot combine ZeRO-2/3 with pipeline parallelism; use zero_stage <= 1")
    elif par.regime == "3d":
        p.require(par.zero_stage <= 1, f"parallel.regime 3d requires parallel.zero_stage <= 1, got "
                                       f"{par.zero_stage}; use parallel.regime=zero3 for ZeRO-2/3")
    p.require(not par.offload_optimizer or par.zero_stage >= 1,
              "parallel.offload_optimizer needs parallel.zero_stage >= 1")
    if par.regime == "3d":
        p.require(tr.stage != "autoencoder", "parallel.regime 3d is for the language models (training.stage "
                                             "calm or baseline); the autoencoder has no backbone to split: "
                                             "train it with parallel.regime=zero3")
        p.require(not par.offload_optimizer, "parallel.offload_optimizer is DeepSpeed's: use it with "
                                             "parallel.regime=zero3 (the 3d regime shards with ZeRO-1)")
        p.require(not par.ds_preset, "parallel.ds_preset configures DeepSpeed, which the 3d regime does not "
                                     "use; leave it empty")
    p.require(not par.sequence_parallel or (par.regime == "3d" and tp > 1),
              "parallel.sequence_parallel splits activations over tensor ranks: it needs parallel.regime=3d "
              f"and parallel.tensor_parallel > 1 (got {par.regime}, {tp})")
    p.require(not par.sequence_parallel or m.attention_backend == "te",
              "parallel.sequence_parallel needs Transformer Engine's norms (model.attention_backend=te): "
              "megatron's torch-norm layers cannot run sequence-parallel; set it to false without TE")
    if par.sequence_parallel and tp > 1:
        steps = _steps_per_block(cfg)
        p.require(steps % tp == 0, f"parallel.sequence_parallel: the {steps} steps per block must divide "
                                   f"by parallel.tensor_parallel ({tp})")
    groups = rules.query_groups(m)
    p.require(m.num_attention_heads % tp == 0 and groups % tp == 0,
              f"parallel.tensor_parallel ({tp}) must divide model.num_attention_heads "
              f"({m.num_attention_heads}) and model.num_query_groups ({groups})")
    p.require(m.num_layers % pp == 0, f"parallel.pipeline_parallel ({pp}) must divide model.num_layers "
                                      f"({m.num_layers})")
    vpp = par.virtual_pipeline_stages
    if vpp > 1:
        p.require(par.regime == "3d" and pp > 1, f"parallel.virtual_pipeline_stages ({vpp}) interleaves "
                                                 "pipeline stages: it needs parallel.regime=3d and "
                                                 "parallel.pipeline_parallel > 1")
        p.require(m.num_layers % (pp * vpp) == 0, f"model.num_layers ({m.num_layers}) must divide by "
                                                  f"parallel.pipeline_parallel x parallel.virtual_pipeline_stages "
                                                  f"= {pp * vpp}")
    if world_size % (tp * pp):
        p.require(False, f"world size {world_size} must be divisible by parallel.tensor_parallel x "
                         f"parallel.pipeline_parallel = {tp * pp}")
        return
    dp = world_size // (tp * pp)
    per_step = tr.micro_batch_size * dp
    if tr.global_batch_size and tr.global_batch_size % per_step:
        p.require(False, f"training.global_batch_size ({tr.global_batch_size}) must be a multiple of "
                         f"training.micro_batch_size x data-parallel size = {tr.micro_batch_size} x {dp} "
                         f"= {per_step}; e.g. {per_step * max(1, tr.global_batch_size // per_step)}")
    elif tr.global_batch_size and tr.gradient_accumulation_steps:
        accum = tr.global_batch_size // per_step
        p.require(accum == tr.gradient_accumulation_steps,
                  f"training.gradient_accumulation_steps ({tr.gradient_accumulation_steps}) disagrees "
                  f"with training.global_batch_size ({tr.global_batch_size}) / (micro {tr.micro_batch_size}"
                  f" x dp {dp}) = {accum}; set one of them to 0 to derive it")
    if vpp > 1:
        accum = tr.global_batch_size // per_step if tr.global_batch_size else tr.gradient_accumulation_steps or 1
        p.require(accum % pp == 0, f"the interleaved schedule runs micro-batches in groups of "
                                   f"parallel.pipeline_parallel ({pp}): the {accum} micro-batches per step "
                                   f"(gradient accumulation) must be a multiple of it")


def _resolve_defaults(cfg: JobConfig) -> None:
    m, ae = cfg.model, cfg.autoencoder
    ae.vocab_size = ae.vocab_size or m.vocab_size
    ae.mask_token_id = m.pad_token_id if ae.mask_token_id == -1 else ae.mask_token_id
    ae.intermediate_size = rules.ae_intermediate_size(ae)
    m.num_query_groups = rules.query_groups(m)
    m.num_mlp_layers = rules.head_blocks(m)


def _steps_per_block(cfg: JobConfig) -> int:
    return rules.steps_per_block(cfg.training.stage, cfg.data.seq_length, cfg.model.patch_size)


def _derive(cfg: JobConfig, world_size: int) -> DerivedConfig:
    tr, par, seq = cfg.training, cfg.parallel, cfg.data.seq_length
    dp = world_size // (par.tensor_parallel * par.pipeline_parallel)
    per_step = tr.micro_batch_size * dp
    if tr.global_batch_size:
        tr.gradient_accumulation_steps = tr.global_batch_size // per_step
    else:
        tr.gradient_accumulation_steps = tr.gradient_accumulation_steps or 1
        tr.global_batch_size = per_step * tr.gradient_accumulation_steps
    return DerivedConfig(
        world_size=world_size,
        data_parallel_size=dp,
        gradient_accumulation_steps=tr.gradient_accumulation_steps,
        global_batch_size=tr.global_batch_size,
        block_tokens=rules.block_tokens(tr.stage, seq, cfg.model.patch_size),
        steps_per_block=_steps_per_block(cfg),
        tokens_per_step=tr.global_batch_size * seq,
    )
