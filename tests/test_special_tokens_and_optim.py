"""CALM.md §9.3 (special-token roles for any tokenizer) and §9.4 (weight decay on matrices and
embeddings only)."""

from __future__ import annotations

import torch

from calm_dist.config import load_config, validate
from calm_dist.data.tokenizer import ENDOFTEXT, train_bpe
from calm_dist.models.autoencoder import Autoencoder
from calm_dist.models.calm import CALM
from calm_dist.optim import param_groups
from calm_dist.parallel.state import ensure_model_parallel


def test_tokenizer_roles_and_added_pad(sotu_bpe_1k):
    tok = sotu_bpe_1k[0]
    # Byte-level BPE uses <|endoftext|> for both BOS and EOS; PAD is added on top at id V.
    assert tok.bos_id == tok.eos_id == tok.backend.token_to_id(ENDOFTEXT)
    assert tok.pad_id == 1024 and tok.vocab_size == 1025
    text = "We the People of the United States, in Order to form a more perfect Union"
    assert tok.decode(tok.encode(text)) == text
    assert tok.pad_id not in tok.encode(text + " <|pad|>")  # PAD never arises from real text


def test_mask_token_defaults_to_pad_and_reference_zero_is_an_option():
    cfg = validate(load_config(["tiny_autoencoder"]))
    assert cfg.autoencoder.mask_token_id == cfg.model.pad_token_id
    ref = validate(load_config(["tiny_autoencoder"], ["autoencoder.mask_token_id=0"]))
    assert ref.autoencoder.mask_token_id == 0


def test_weight_decay_only_on_matrices_and_embeddings():
    ensure_model_parallel()
    cfg = validate(load_config(["tiny_calm"], ["model.num_layers=1", "model.hidden_size=64",
                                               "model.intermediate_size=172", "autoencoder.hidden_size=64",
                                               "autoencoder.intermediate_size=160"]))
    model = CALM(cfg.model, Autoencoder(cfg.autoencoder))
    groups = param_groups(model, cfg)
    decay = [p for g in groups if g["name"].endswith(".decay") for p in g["params"]]
    no_decay = [p for g in groups if g["name"].endswith(".no_decay") for p in g["params"]]
    assert {g["weight_decay"] for g in groups} == {cfg.optimizer.weight_decay, 0.0}
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith(".no_decay"))
    assert all(p.dim() >= 2 for p in decay) and all(p.dim() == 1 for p in no_decay)
    ids = {id(p) for p in decay + no_decay}
    assert id(model.embed_tokens.weight) in {id(p) for p in decay}
    assert id(model.head.output.bias) in {id(p) for p in no_decay}
    assert not any(id(p) in ids for p in model.autoencoder.parameters())  # frozen: not optimised
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(trainable)
    torch.optim.AdamW(param_groups(model, cfg), lr=1e-3)  # accepted as-is by the optimizer
