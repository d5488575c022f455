"""The chunk autoencoder (CALM.md §1): K tokens <-> one latent vector of size l.

Context-free (no attention): it sees one chunk only. Shapes: B batch, C chunks, K tokens per chunk,
D hidden, L latent size, V vocabulary.

Encoder: embed -> per-token AE layers -> flatten and squeeze (K*D -> D) -> AE layers -> RMSNorm ->
Linear(D -> 2L) = (mu, log_sigma). Decoder: Linear(L -> D) -> AE layers -> expand (D -> K*D) ->
per-token AE layers -> RMSNorm -> logits against the tied input embedding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from calm_dist.config.schema import AutoencoderConfig
from calm_dist.models.init import init_llama_


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AELayer(nn.Module):
    """Pre-norm residual FFN: h <- h + SwiGLU(RMSNorm(h))."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.mlp = SwiGLU(hidden_size, intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h))


class TiedProjection(nn.Module):
    """Logits against a tied embedding table: h @ E^T, no bias, no parameters of its own.

    The table stays owned by the embedding; this module only reads it. Being a module of its own
    gives sharded-parameter wrappers (ZeRO-3) one place to declare that read
    (`calm_dist.parallel.zero3.register_tied_weights`)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # a reference, not a second registration

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.embedding.weight.t()


def _split_layers(count: int) -> tuple[int, int]:
    """Layers before and after the squeeze/expand: half and half (CALM.md §9.5)."""
    before = count // 2
    return before, count - before


class AutoencoderOutput(NamedTuple):
    """A NamedTuple so that DeepSpeed ZeRO-3 finds the tensors in it (its hooks see tuples)."""

    loss: torch.Tensor  # K * CE + kl_weight * KLclip (the training objective, eq. 1-4)
    ce: torch.Tensor  # mean token cross-entropy against the ORIGINAL tokens
    kl: torch.Tensor  # mean over chunks of the summed, unclipped per-dimension KL
    kl_clipped: torch.Tensor  # mean over chunks of sum_i max(KL_i, kl_clamp)
    accuracy: torch.Tensor  # token accuracy of argmax decoding
    sigma_mean: torch.Tensor  # mean posterior std (monitors the latent geometry, §9.11)
    logits: torch.Tensor  # (B, C, K, V)


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if cfg.vocab_size <= 0 or cfg.mask_token_id < 0 or cfg.intermediate_size <= 0:
            raise ValueError(
                "Autoencoder needs a validated config (vocab_size, mask_token_id and "
                "intermediate_size resolved): pass it through calm_dist.config.validate first"
            )
        self.cfg = cfg
        d, k, ffn, eps = cfg.hidden_size, cfg.patch_size, cfg.intermediate_size, cfg.rms_norm_eps
        enc_before, enc_after = _split_layers(cfg.num_encoder_layers)
        dec_before, dec_after = _split_layers(cfg.num_decoder_layers)

        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.encoder_token_layers = nn.ModuleList(AELayer(d, ffn, eps) for _ in range(enc_before))
        self.squeeze = nn.Linear(k * d, d)
        self.encoder_chunk_layers = nn.ModuleList(AELayer(d, ffn, eps) for _ in range(enc_after))
        self.encoder_norm = nn.RMSNorm(d, eps=eps)
        self.latent_head = nn.Linear(d, 2 * cfg.latent_size)

        self.decoder_in = nn.Linear(cfg.latent_size, d)
        self.decoder_chunk_layers = nn.ModuleList(AELayer(d, ffn, eps) for _ in range(dec_before))
        self.expand = nn.Linear(d, k * d)
        self.decoder_token_layers = nn.ModuleList(AELayer(d, ffn, eps) for _ in range(dec_after))
        self.decoder_norm = nn.RMSNorm(d, eps=eps)
        self.output_projection = TiedProjection(self.embed_tokens)
        init_llama_(self, cfg.init_std)

    # -- encoder / decoder ------------------------------------------------------------------
    def encode(self, tokens_BCK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunks of K token ids -> (mu, log_sigma), each (B, C, L), in fp32."""
        b, c, k = tokens_BCK.shape
        if k != self.cfg.patch_size:
            raise ValueError(f"chunks of {k} tokens given, the autoencoder expects {self.cfg.patch_size}")
        h = self.embed_tokens(tokens_BCK)  # (B, C, K, D)
        for layer in self.encoder_token_layers:
            h = layer(h)
        h = self.squeeze(h.reshape(b, c, k * self.cfg.hidden_size))
        for layer in self.encoder_chunk_layers:
            h = layer(h)
        stats = self.latent_head(self.encoder_norm(h)).float()
        mu, log_sigma = stats.chunk(2, dim=-1)
        return mu, log_sigma

    def decode(self, z_BCL: torch.Tensor) -> torch.Tensor:
        """Latents -> logits (B, C, K, V) against the tied input embedding."""
        b, c, _ = z_BCL.shape
        h = self.decoder_in(z_BCL.to(self.decoder_in.weight.dtype))
        for layer in self.decoder_chunk_layers:
            h = layer(h)
        h = self.expand(h).reshape(b, c, self.cfg.patch_size, self.cfg.hidden_size)
        for layer in self.decoder_token_layers:
            h = layer(h)
        return self.output_projection(self.decoder_norm(h))

    @torch.no_grad()
    def decode_tokens(self, z_BCL: torch.Tensor, chunk_positions: int = 256) -> torch.Tensor:
        """Argmax decoding (CALM.md §8.13): all stochasticity lives upstream of the decoder.
        Decoded in slices of positions so that the (positions, K, V) logits stay small."""
        b, c, latent = z_BCL.shape
        flat = z_BCL.reshape(1, b * c, latent)
        pieces = [self.decode(flat[:, i : i + chunk_positions]).argmax(dim=-1)
                  for i in range(0, b * c, chunk_positions)]
        return torch.cat(pieces, dim=1).reshape(b, c, self.cfg.patch_size)

    @staticmethod
    def sample_posterior(mu: torch.Tensor, log_sigma: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """z = mu + sigma * eps; with num_samples, a leading sample axis (M, ...)."""
        sigma = log_sigma.float().exp()
        if num_samples is None:
            return mu + sigma * torch.randn_like(mu)
        eps = torch.randn((num_samples, *mu.shape), dtype=mu.dtype, device=mu.device)
        return mu.unsqueeze(0) + sigma.unsqueeze(0) * eps

    # -- training objective -----------------------------------------------------------------
    def _mask_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """CBOW-like token masking: each id replaced by mask_token_id with probability p."""
        keep = torch.rand(tokens.shape, device=tokens.device) >= self.cfg.token_dropout
        return torch.where(keep, tokens, torch.full_like(tokens, self.cfg.mask_token_id))

    def kl_terms(self, mu: torch.Tensor, log_sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean summed KL, mean summed per-dimension-clipped KL) over chunks, in fp32.

        The clamp is per dimension, before the sum (CALM.md §8.6): a dimension below the floor
        gets no gradient pushing it further towards the prior.
        """
        mu, log_sigma = mu.float(), log_sigma.float()
        kl_per_dim = 0.5 * (mu.square() + (2 * log_sigma).exp() - 1.0 - 2.0 * log_sigma)
        kl = kl_per_dim.sum(-1).mean()
        kl_clipped = kl_per_dim.clamp(min=self.cfg.kl_clamp).sum(-1).mean()
        return kl, kl_clipped

    def forward(self, tokens_BCK: torch.Tensor) -> AutoencoderOutput:
        """Variational objective; masking and latent dropout only in training mode (CALM.md §1.2)."""
        inputs = self._mask_tokens(tokens_BCK) if self.training and self.cfg.token_dropout > 0 else tokens_BCK
        mu, log_sigma = self.encode(inputs)
        z = self.sample_posterior(mu, log_sigma)  # the reference samples at eval time too
        if self.training and self.cfg.latent_dropout > 0:
            z = F.dropout(z, p=self.cfg.latent_dropout, training=True)  # inverted dropout
        logits = self.decode(z)
        ce = F.cross_entropy(logits.float().flatten(0, -2), tokens_BCK.flatten())
        kl, kl_clipped = self.kl_terms(mu, log_sigma)
        loss = self.cfg.patch_size * ce + self.cfg.kl_weight * kl_clipped
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == tokens_BCK).float().mean()
            sigma_mean = log_sigma.exp().mean()
        return AutoencoderOutput(loss, ce, kl, kl_clipped, accuracy, sigma_mean, logits)

    @torch.no_grad()
    def reconstruction_accuracy(self, tokens_BCK: torch.Tensor, use_mean: bool = False) -> torch.Tensor:
        """Token accuracy of decoding a posterior sample (default) or the mean of each chunk."""
        mu, log_sigma = self.encode(tokens_BCK)
        z = mu if use_mean else self.sample_posterior(mu, log_sigma)
        return (self.decode_tokens(z) == tokens_BCK).float().mean()
