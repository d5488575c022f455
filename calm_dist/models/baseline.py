"""The token-level baseline (CALM.md §2.6): the same backbone, a softmax head, cross-entropy.

It lives in the same system so that every comparison in the paper (BrierLM, FLOPs, speed) can be
made with identical layers. Untied input and output embeddings, as the paper's Transformers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from calm_dist.config.schema import ModelConfig
from calm_dist.models.backbone import Backbone, BackboneOptions
from calm_dist.models.init import whole


class BaselineOutput(NamedTuple):
    """A NamedTuple so that DeepSpeed ZeRO-3 finds the tensors in it (its hooks see tuples)."""

    loss: torch.Tensor  # mean next-token cross-entropy (fp32)
    num_positions: int


def token_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, in fp32."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())


class TokenBaseline(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        attention_backend: str | None = None,
        backbone_options: BackboneOptions = BackboneOptions(),
    ):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.backbone = Backbone(cfg, attention_backend=attention_backend, options=backbone_options)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        with whole([self.embed_tokens.weight, self.lm_head.weight]):
            nn.init.normal_(self.embed_tokens.weight, std=cfg.init_std)
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        self.token_loss = token_loss  # a vocabulary-parallel one under tensor parallelism

    def logits(self, tokens_BT: torch.Tensor, cache=None) -> torch.Tensor:
        """Next-token logits at every position: (B, T, V)."""
        return self.lm_head(self.backbone(self.embed_tokens(tokens_BT), cache=cache))

    def next_token_logits(self, tokens_BT: torch.Tensor, cache=None) -> torch.Tensor:
        """Logits after the last position only: (B, V). Generation's prefill skips the output
        layer at the prompt's other positions (B x T x V of work for nothing)."""
        return self.lm_head(self.backbone(self.embed_tokens(tokens_BT), cache=cache)[:, -1])

    # forward = loss_from_hidden(backbone(transformer_inputs(tokens)), tokens); pipeline stages
    # run the three parts on different ranks.
    def transformer_inputs(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """A block of T + 1 tokens -> the backbone's (B, T, D) inputs (tokens 1..T)."""
        return self.embed_tokens(tokens_BT[:, :-1])

    def forward(self, tokens_BT: torch.Tensor) -> BaselineOutput:
        """Cross-entropy of a batch of blocks of T + 1 tokens (inputs 1..T, targets 2..T+1)."""
        return self.loss_from_hidden(self.backbone(self.transformer_inputs(tokens_BT)), tokens_BT)

    def loss_from_hidden(self, h_BTD: torch.Tensor, tokens_BT: torch.Tensor) -> BaselineOutput:
        """Next-token cross-entropy of the backbone states h (B, T, D) against tokens 2..T+1."""
        logits_BTV = self.lm_head(h_BTD)
        loss = self.token_loss(logits_BTV, tokens_BT[:, 1:])
        return BaselineOutput(loss=loss, num_positions=logits_BTV.shape[0] * logits_BTV.shape[1])
