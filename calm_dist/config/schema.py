"""Typed configuration, split by concern.

Every section is a plain dataclass with defaults; `JobConfig` groups them. Field names follow the
reference CALM code where it has one (`patch_size` = K, `latent_size`, `num_samples`, `beta`).
Loading (YAML layers + dotted overrides) lives in `loader.py`; the single validation step that
derives batch arithmetic and rejects illegal combinations lives in `validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

AttentionBackend = Literal["auto", "flash_attn", "sdpa", "te", "local"]
Stage = Literal["autoencoder", "calm", "baseline"]
Precision = Literal["fp32", "bf16"]
Regime = Literal["zero3", "3d"]
LRSchedule = Literal["constant", "cosine"]
ProgressBar = Literal["auto", "on", "off"]
DataVerify = Literal["lazy", "full"]
Recompute = Literal["none", "selective", "full"]
Zero3Gather = Literal["layer", "block", "linear"]


@dataclass
class AutoencoderConfig:
    """The chunk autoencoder (CALM.md §1). No attention: it sees one chunk of K tokens only."""

    vocab_size: int = 0  # 0: same as model.vocab_size (the two models share one tokenizer)
    patch_size: int = 4  # K, tokens per chunk
    latent_size: int = 128  # l, the latent vector size (reference rule: 32*K)
    hidden_size: int = 512
    intermediate_size: int = 0  # 0: 2.5 x hidden_size (CALM.md §9.5)
    num_encoder_layers: int = 2  # split half before, half after the squeeze
    num_decoder_layers: int = 2  # split half before, half after the expand
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    token_dropout: float = 0.15  # p of replacing an input id by mask_token_id (training only)
    latent_dropout: float = 0.15  # inverted dropout on the sampled z (training only)
    kl_weight: float = 1e-3  # beta of the KL term
    kl_clamp: float = 0.5  # lambda_KL: per-dimension floor of the KL ("free bits")
    mask_token_id: int = -1  # -1: the PAD id (CALM.md §9.3); 0 reproduces the reference


@dataclass
class ModelConfig:
    """The language model: the Llama-style backbone shared by CALM and the token baseline, plus
    CALM's input compressor and energy head (CALM.md §2)."""

    vocab_size: int = 50258  # including the added PAD token
    pad_token_id: int = 50257
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    hidden_size: int = 1024
    intermediate_size: int = 2752
    num_layers: int = 16
    num_attention_heads: int = 16
    num_query_groups: int = 0  # 0: multi-head attention (kv heads = heads)
    max_position_embeddings: int = 2048  # counted in model steps (chunks for CALM)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    attention_backend: AttentionBackend = "auto"
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # CALM only -------------------------------------------------------------------------------
    patch_size: int = 4  # K; must equal autoencoder.patch_size
    latent_size: int = 128  # must equal autoencoder.latent_size
    num_mlp_layers: int = 0  # energy-head residual blocks; 0: num_layers // 4
    noise_size: int = 64  # uniform noise U[-0.5, 0.5]^noise_size fed to the head
    num_samples: int = 8  # N, head samples per position in the energy loss
    num_target_samples: int = 100  # M, posterior samples of the target per position
    beta: float = 1.0  # energy-score exponent (alpha in the paper); strictly proper in (0, 2)
    energy_chunk_positions: int = 1024  # positions per chunk of the energy loss (bounds memory)


@dataclass
class DataConfig:
    """Where tokens come from. The loader itself belongs to the data pipeline."""

    train_path: str = ""
    valid_path: str = ""
    tokenizer: str = "gpt2"  # a name, a tokenizer.json path, or a directory with one
    seq_length: int = 2048  # tokens the model reads per block (context); a multiple of K for CALM
    num_workers: int = 1
    seed: int = 1234
    resampled: bool = False  # sample shards with replacement: statistical, not exact, continuity
    skip_corrupt: bool = False  # skip (count and log) corrupt shards instead of stopping
    # Shards checked against index.json: "lazy" sizes at start-up and each shard's sha256 when read;
    # "full" every checksum at start-up too (one read of the data before training).
    verify: DataVerify = "lazy"
    # Blocks mixed in seeded windows of this many (0/1: stream order): batches of consecutive blocks
    # of one document stall CALM. Costs this many blocks of memory per worker.
    shuffle_blocks: int = 1024


@dataclass
class OptimizerConfig:
    """AdamW as the reference trains (CALM.md §1.3, §2.6)."""

    lr: float = 3e-4
    min_lr: float = 0.0  # floor of the cosine schedule
    schedule: LRSchedule = "constant"
    warmup_steps: int = 2000
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices and embeddings only (CALM.md §9.4)
    grad_clip: float = 1.0
    # Per module group (calm_dist/module_groups.py: embeddings, compressor, backbone, head; the
    # autoencoder stage has one group, autoencoder). Missing groups: multiplier 1, no delay.
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # x lr (and x min_lr)
    weight_decay_multipliers: dict[str, float] = field(default_factory=dict)  # x weight_decay
    lr_delay_steps: dict[str, int] = field(default_factory=dict)  # LR 0 for D steps, then warmup + schedule


@dataclass
class ParallelConfig:
    """Two supported regimes: `zero3` (TP = PP = 1, DeepSpeed ZeRO-3 across all
    ranks) and `3d` (megatron-core TP and PP; ZeRO-1 or no sharding over data parallelism)."""

    regime: Regime = "zero3"
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_stages: int = 1  # model chunks per pipeline rank (interleaved 1F1B when > 1)
    zero_stage: int = 3  # the 3d regime takes 0 or 1
    sequence_parallel: bool = False  # 3d with TP > 1 and Transformer Engine (attention_backend te)
    activation_recompute: Recompute = "none"  # selective: core attention; full: whole layers
    offload_optimizer: bool = False
    ds_preset: str = ""  # zero3 only: a ds_configs/*.json preset; empty: chosen from the precision
    # zero3 with zero_stage 3: build the model under deepspeed.zero.Init, each module partitioned as
    # soon as it is built, so that no rank ever holds the whole model (ignored otherwise).
    zero_init: bool = True
    # zero3 with zero_stage 3: what ZeRO-3 gathers at once (DeepSpeed leaf modules: one gather and
    # one set of hooks per unit). layer: each backbone layer; block: each attention block and each
    # MLP; linear: every linear on its own (DeepSpeed's default; finer prefetching, more gathers).
    zero3_gather: Zero3Gather = "layer"


@dataclass
class TrainingConfig:
    stage: Stage = "calm"
    micro_batch_size: int = 4  # sequences per rank per forward
    global_batch_size: int = 0  # sequences per optimizer step; 0: micro x dp (no accumulation)
    gradient_accumulation_steps: int = 0  # derived by validation
    train_steps: int = 1000
    seed: int = 1234
    precision: Precision = "fp32"
    output_dir: str = "outputs/run"
    autoencoder_path: str = ""  # a trained autoencoder, required by stage calm
    init_weights: str = ""  # start from these weights: a calm-convert directory or a .safetensors file
    save_interval: int = 500
    eval_interval: int = 500
    eval_steps: int = 10
    keep_last: int = 3
    device: str = "auto"  # auto | cpu | cuda
    # Resume: from `latest` in output_dir/checkpoints unless told otherwise.
    resume: bool = True
    load_step: int = -1  # -1: the newest complete checkpoint; N: global_stepN exactly
    load_rng: bool = True  # restore every rank's RNG streams (exact continuation)
    load_optimizer: bool = True  # restore optimizer and LR-schedule state
    # A newest checkpoint that fails verification is renamed aside and the newest one that verifies
    # is loaded instead (false: an error naming the damaged file).
    resume_fallback: bool = True
    # Stopping: SIGTERM/SIGUSR1 always save and exit 0; a wall-clock budget does the same.
    wall_clock_minutes: float = 0.0  # 0: no budget
    max_bad_steps: int = 5  # NaN/inf losses in a row before the run stops (with a checkpoint)
    # How long a rank waits in one collective for its peers before it fails (the process group's
    # timeout). A peer that died closes its sockets and fails the others at once; this bounds the
    # wait on one that hangs or a network that dropped. Longer than the slowest checkpoint save.
    collective_timeout_minutes: float = 30.0


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = True
    jsonl: bool = True
    wandb: bool = False
    wandb_project: str = "calm-dist"
    progress_bar: ProgressBar = "auto"  # auto: a bar in an interactive single-process run, plain lines otherwise
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: from the device table


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    derived: Optional["DerivedConfig"] = None  # filled by validate(), never by the user


@dataclass(frozen=True)
class DerivedConfig:
    """Values computed by validation; read-only."""

    world_size: int
    data_parallel_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    block_tokens: int  # tokens per training block: context + one target step (CALM.md §9.7)
    steps_per_block: int  # model steps per block read by the transformer (chunks or tokens)
    tokens_per_step: int  # tokens consumed per optimizer step
