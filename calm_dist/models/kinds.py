"""The model kinds (`training.stage`): the one place that says what an autoencoder, a CALM and a
token baseline are to the rest of the package: how one is built, what it reads from a batch of
token blocks, what it logs per step, how it scores an evaluation block, how its conversion is
probed, which of its modules are frozen, and where a pipeline cuts it. Adding a kind (another head from the paper's
ablations, say) means adding one `ModelKind` here; the trainer, the evaluator, the loader and the
converter look kinds up instead of comparing names.

What stays elsewhere, on purpose: config validation and block arithmetic (`calm_dist.config`, the
bottom layer, which knows the stage names as config values), the FLOPs and memory formulas
(`calm_dist.flops`, `calm_dist.parallel.memory`), and the converted-directory format
(`calm_dist.checkpoint.hf_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from calm_dist.config.schema import JobConfig
from calm_dist.models.autoencoder import Autoencoder
from calm_dist.models.backbone import BackboneOptions
from calm_dist.models.baseline import TokenBaseline
from calm_dist.models.calm import CALM
from calm_dist.models.scoring import (
    BlockScore,
    score_autoencoder_block,
    score_baseline_block,
    score_baseline_blocks,
    score_calm_block,
)

Probe = Callable[[nn.Module, torch.Tensor, int], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ModelKind:
    name: str
    # (cfg, backbone options or None for the defaults, a trained autoencoder for CALM or None
    # for a fresh one) -> an untrained model
    build: Callable[[JobConfig, BackboneOptions | None, nn.Module | None], nn.Module]
    reads_chunks: bool  # its inputs are (B, C, K) chunks of a block, not the token block itself
    # (log key, output field) of the scalars logged per step besides the loss
    logged_outputs: tuple[tuple[str, str], ...]
    score_block: Callable[..., BlockScore]  # calm_dist.models.scoring
    brier_family: str | None  # the BrierLM figures its evaluation reports (None: no BrierLM)
    loss_name: str  # its evaluation loss in calm-eval's report
    eval_log_loss: str  # ... and in the training log's eval lines
    perplexity: bool  # the loss is a next-token cross-entropy: report exp(loss) too
    probe_tokens: Callable[[JobConfig, int, torch.Generator], torch.Tensor]  # conversion check inputs
    probe_outputs: Probe  # outputs a conversion must reproduce, each after seeding torch with `seed`
    frozen_modules: tuple[str, ...] = ()  # top-level modules that never train
    # (model, blocks_BT, seeds, rollout=) -> a BlockScore per block, the same as score_block's on
    # each: several blocks in one forward; None: scored block by block
    score_batch: Callable[..., list[BlockScore]] | None = None
    # Pipeline split points (the 3d regime): the top-level modules only the model's first chunk
    # keeps and those only its last chunk keeps; None: the kind is not pipelined.
    first_chunk_only: tuple[str, ...] | None = None
    last_chunk_only: tuple[str, ...] | None = None

    def step_metrics(self, out) -> dict[str, float]:
        """The scalars to log from one forward's output (besides the loss)."""
        return {key: getattr(out, field).item() for key, field in self.logged_outputs}

    def inputs(self, cfg: JobConfig, tokens_BT: torch.Tensor) -> torch.Tensor:
        """What the model reads from a batch of token blocks."""
        if self.reads_chunks:
            return tokens_BT.reshape(tokens_BT.shape[0], -1, cfg.autoencoder.patch_size)
        return tokens_BT



# autoencoder ---------------------------------------------------------------------------------

def _probe_autoencoder_tokens(cfg: JobConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(cfg.model.vocab_size, (batch, 8, cfg.autoencoder.patch_size), generator=generator)


def _probe_autoencoder(model, tokens: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    mu, _ = model.encode(tokens)
    return {"mu": mu.float(), "decoded": model.decode_tokens(mu)}


AUTOENCODER = ModelKind(
    name="autoencoder",
    build=lambda cfg, options, autoencoder: Autoencoder(cfg.autoencoder),
    reads_chunks=True,
    logged_outputs=(("ce", "ce"), ("kl", "kl"), ("acc", "accuracy"), ("sigma", "sigma_mean")),
    score_block=score_autoencoder_block,
    brier_family=None,
    loss_name="ce",
    eval_log_loss="ce",
    perplexity=False,
    probe_tokens=_probe_autoencoder_tokens,
    probe_outputs=_probe_autoencoder,
)


# CALM ----------------------------------------------------------------------------------------

def _build_calm(cfg: JobConfig, options: BackboneOptions | None, autoencoder: nn.Module | None) -> nn.Module:
    return CALM(cfg.model, autoencoder if autoencoder is not None else Autoencoder(cfg.autoencoder),
                backbone_options=options or BackboneOptions())


def _probe_calm_tokens(cfg: JobConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    k = cfg.model.patch_size
    steps = min(8, cfg.data.seq_length // k)
    return torch.randint(cfg.model.vocab_size, (batch, (steps + 1) * k), generator=generator)


def _probe_calm(model, tokens: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    k = model.cfg.patch_size
    torch.manual_seed(seed)
    loss = model(tokens).loss
    torch.manual_seed(seed)
    hidden = model.hidden_states(tokens[:, :-k])
    chunks = model.sample_chunks(hidden.reshape(-1, hidden.shape[-1]), num_samples=4)
    return {"loss": loss.float(), "chunks": chunks}


CALM_KIND = ModelKind(
    name="calm",
    build=_build_calm,
    reads_chunks=False,
    logged_outputs=(("fid", "fidelity"), ("div", "diversity"), ("cos", "state_cosine")),
    score_block=score_calm_block,
    brier_family="calm",
    loss_name="energy_loss",
    eval_log_loss="loss",
    perplexity=False,
    probe_tokens=_probe_calm_tokens,
    probe_outputs=_probe_calm,
    frozen_modules=("autoencoder",),
    first_chunk_only=("embed_tokens", "compressor"),
    last_chunk_only=("head", "autoencoder"),
)


# token baseline ------------------------------------------------------------------------------

def _probe_baseline_tokens(cfg: JobConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(cfg.model.vocab_size, (batch, min(32, cfg.data.seq_length) + 1), generator=generator)


def _probe_baseline(model, tokens: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    loss = model(tokens).loss
    torch.manual_seed(seed)
    return {"loss": loss.float(), "logits": model.logits(tokens[:, :-1]).float()}


BASELINE = ModelKind(
    name="baseline",
    build=lambda cfg, options, autoencoder: TokenBaseline(cfg.model, backbone_options=options or BackboneOptions()),
    reads_chunks=False,
    logged_outputs=(),
    score_block=score_baseline_block,
    score_batch=score_baseline_blocks,
    brier_family="all",
    loss_name="ce",
    eval_log_loss="loss",
    perplexity=True,
    probe_tokens=_probe_baseline_tokens,
    probe_outputs=_probe_baseline,
    first_chunk_only=("embed_tokens",),
    last_chunk_only=("lm_head",),
)


MODEL_KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (AUTOENCODER, CALM_KIND, BASELINE)}


def model_kind(name: str) -> ModelKind:
    """The kind called `name` (a `training.stage`); an unknown name is an error listing the kinds."""
    try:
        return MODEL_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown model kind {name!r}: one of {', '.join(MODEL_KINDS)}") from None
