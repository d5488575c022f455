"""The CALM language model (CALM.md §2): next-vector prediction with an energy-based head.

A block of (S + 1) chunks of K tokens: the transformer reads chunks 1..S (their tokens, through the
compressor) and the targets are the latents of chunks 2..S+1, sampled M times from the frozen
autoencoder's posterior. Shapes: B batch, S steps (chunks), K tokens per chunk, D hidden,
L latent, N head samples, M target samples, P = B*S positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from calm_dist.config.rules import head_blocks
from calm_dist.config.schema import ModelConfig
from calm_dist.models.autoencoder import Autoencoder
from calm_dist.models.backbone import Backbone, BackboneOptions
from calm_dist.models.compressor import ChunkCompressor
from calm_dist.models.energy_head import EnergyHead
from calm_dist.models.init import NormalEmbedding
from calm_dist.ops.collapse import pairwise_cosine_tensor
from calm_dist.ops.energy import energy_loss


class CALMOutput(NamedTuple):
    """A NamedTuple so that DeepSpeed ZeRO-3 finds the tensors in it (its hooks see tuples)."""

    loss: torch.Tensor  # mean over positions of 2 * fidelity - diversity
    fidelity: torch.Tensor  # mean ||z_n - y_m||^beta
    diversity: torch.Tensor  # mean ||z_n - z_k||^beta, n != k
    num_positions: int
    # Mean pairwise cosine of the backbone states read by the head: -> 1 when the backbone
    # collapses to one state for every context (the collapse alarm, docs/learning.md).
    state_cosine: torch.Tensor


class CALM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        autoencoder: Autoencoder,
        attention_backend: str | None = None,
        backbone_options: BackboneOptions = BackboneOptions(),
    ):
        super().__init__()
        ae_cfg = autoencoder.cfg
        if (ae_cfg.patch_size, ae_cfg.latent_size, ae_cfg.vocab_size) != (cfg.patch_size, cfg.latent_size, cfg.vocab_size):
            raise ValueError(
                "the autoencoder does not match the model: (patch_size, latent_size, vocab_size) = "
                f"{(ae_cfg.patch_size, ae_cfg.latent_size, ae_cfg.vocab_size)} vs "
                f"{(cfg.patch_size, cfg.latent_size, cfg.vocab_size)}"
            )
        self.cfg = cfg
        d = cfg.hidden_size
        self.embed_tokens = NormalEmbedding(cfg.vocab_size, d, cfg.init_std)
        self.compressor = ChunkCompressor(d, cfg.patch_size, cfg.init_std)
        self.backbone = Backbone(cfg, attention_backend=attention_backend, options=backbone_options)
        self.head = EnergyHead(d, cfg.latent_size, cfg.noise_size, head_blocks(cfg), cfg.init_std)
        self.autoencoder = autoencoder
        self.autoencoder.requires_grad_(False)  # frozen and clean in stage 2 (CALM.md §8.5)
        self.autoencoder.eval()

    def train(self, mode: bool = True) -> "CALM":
        super().train(mode)
        if self.autoencoder is not None:  # None on pipeline stages other than the last
            self.autoencoder.eval()  # no token masking, no latent dropout, ever
        return self

    # -- building blocks used by training, evaluation and generation -------------------------
    def step_inputs(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """(B, S*K) token ids -> (B, S, D) transformer inputs."""
        if tokens_BT.shape[1] % self.cfg.patch_size:
            raise ValueError(f"{tokens_BT.shape[1]} tokens is not a multiple of K = {self.cfg.patch_size}")
        return self.compressor(self.embed_tokens(tokens_BT))

    def hidden_states(self, tokens_BT: torch.Tensor, cache=None) -> torch.Tensor:
        """Backbone states after its final norm, one per chunk read: (B, S, D)."""
        return self.backbone(self.step_inputs(tokens_BT), cache=cache)

    def sample_latents(self, h_PD: torch.Tensor, num_samples: int) -> torch.Tensor:
        return self.head.sample(h_PD, num_samples)

    @torch.no_grad()
    def sample_chunks(self, h_PD: torch.Tensor, num_samples: int) -> torch.Tensor:
        """num_samples decoded chunks per position: (N, P, K) token ids."""
        z_NPL = self.sample_latents(h_PD, num_samples)
        return self.autoencoder.decode_tokens(z_NPL)

    @torch.no_grad()
    def target_posterior(self, chunks_BSK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.autoencoder.encode(chunks_BSK)

    # -- training objective ------------------------------------------------------------------
    # forward = loss_from_hidden(backbone(transformer_inputs(tokens)), tokens); pipeline stages
    # run the three parts on different ranks.
    def transformer_inputs(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """A block of (S + 1) * K tokens -> the backbone's (B, S, D) inputs (chunks 1..S)."""
        k, t = self.cfg.patch_size, tokens_BT.shape[1]
        if t % k or t // k < 2:
            raise ValueError(f"a CALM block needs (S + 1) * K tokens with S >= 1; got {t} tokens, K = {k}")
        return self.step_inputs(tokens_BT[:, :-k])

    def forward(self, tokens_BT: torch.Tensor) -> CALMOutput:
        """Energy loss of a batch of blocks of (S + 1) * K tokens."""
        return self.loss_from_hidden(self.backbone(self.transformer_inputs(tokens_BT)), tokens_BT)

    def loss_from_hidden(self, h_BSD: torch.Tensor, tokens_BT: torch.Tensor) -> CALMOutput:
        """Energy loss of the backbone states h (B, S, D) against chunks 2..S+1 of the block."""
        k = self.cfg.patch_size
        b, t = tokens_BT.shape
        mu_BSL, log_sigma_BSL = self.target_posterior(tokens_BT[:, k:].reshape(b, t // k - 1, k))
        h_PD = h_BSD.reshape(-1, h_BSD.shape[-1])
        mu_PL, sigma_PL = mu_BSL.reshape(-1, mu_BSL.shape[-1]), log_sigma_BSL.reshape(-1, mu_BSL.shape[-1]).exp()
        samples_NPL = self.sample_latents(h_PD, self.cfg.num_samples)
        loss, fidelity, diversity = self._chunked_energy(samples_NPL, mu_PL, sigma_PL)
        return CALMOutput(loss=loss, fidelity=fidelity, diversity=diversity, num_positions=h_PD.shape[0],
                          state_cosine=pairwise_cosine_tensor(h_PD))

    def _chunked_energy(self, samples_NPL, mu_PL, sigma_PL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targets are drawn chunk by chunk so that M x P x L never exists at once (§8.3)."""
        positions = mu_PL.shape[0]
        step = max(1, self.cfg.energy_chunk_positions)
        totals = torch.zeros(3, device=mu_PL.device, dtype=torch.float32)
        parts = []
        for start in range(0, positions, step):
            end = min(positions, start + step)
            eps_MPL = torch.randn(self.cfg.num_target_samples, end - start, mu_PL.shape[-1], device=mu_PL.device)
            targets_MPL = mu_PL[start:end] + sigma_PL[start:end] * eps_MPL
            part = energy_loss(samples_NPL[:, start:end], targets_MPL, beta=self.cfg.beta, chunk_positions=step)
            weight = (end - start) / positions
            parts.append(part.loss * weight)
            totals += weight * torch.stack([part.fidelity.detach(), part.diversity.detach(), part.loss.detach()])
        return torch.stack(parts).sum(), totals[0], totals[1]


@torch.no_grad()
def unconditional_energy(model: CALM, blocks_BT: torch.Tensor) -> float:
    """Energy loss of an unconditional predictor (CALM.md §9.11): as its N samples, posterior
    samples of random OTHER chunks of the same blocks, against the true targets. A CALM whose loss
    is below this uses its context; at it, it has learned only the marginal. Draws from the default
    generator of the blocks' device (seed it for a reproducible figure); targets are drawn chunk by
    chunk over positions (model.energy_chunk_positions), like the training loss, to bound memory."""
    k, cfg = model.cfg.patch_size, model.cfg
    mu, log_sigma = model.target_posterior(blocks_BT[:, k:].reshape(blocks_BT.shape[0], -1, k))
    mu, sigma = mu.reshape(-1, mu.shape[-1]).float(), log_sigma.reshape(-1, mu.shape[-1]).float().exp()
    positions, device = mu.shape[0], mu.device
    picks = [torch.randperm(positions, device=device) for _ in range(cfg.num_samples)]
    step, total = max(1, cfg.energy_chunk_positions), 0.0
    for start in range(0, positions, step):
        end = min(positions, start + step)
        samples_NPL = torch.stack([mu[i[start:end]] + sigma[i[start:end]] * torch.randn_like(mu[start:end])
                                   for i in picks])
        targets_MPL = mu[start:end] + sigma[start:end] * torch.randn(
            cfg.num_target_samples, end - start, mu.shape[-1], device=device)
        total += energy_loss(samples_NPL, targets_MPL, beta=cfg.beta).loss.item() * (end - start)
    return total / positions
