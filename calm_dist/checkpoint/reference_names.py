"""The reference implementation's tensor names and layouts <-> calm-dist's, both ways, exactly.

The reference (the CALM authors' code, Hugging Face style) and calm-dist compute the same
functions; only names and a few layouts differ (docs/checkpoints.md, "The reference format"):

- autoencoder: `encoder.*` / `decoder.*` modules, one list of layers each (the first half of the
  encoder's runs per token, the second per chunk; the decoder the other way round), the output
  projection tied to the input embedding (`decoder.lm_head_weight`, absent from a safetensors save);
- CALM: Llama names for the backbone with separate q/k/v and gate/up projections, which
  megatron-core fuses (q/k/v per key-value group: that group's query heads, its k head, its v head);
  the generative head registered twice (`mlp_generator.*` and `generative_head.*`, the same
  tensors); the frozen autoencoder under `ae_model.*`.

A mapping is a list of rules, one per calm-dist tensor, with the shape the config implies. Import
uses every source tensor exactly once (copies of a tied or twice-registered tensor must be equal)
and invents none: anything missing, left over or of the wrong shape is an error listing the names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from calm_dist.checkpoint.reading import ConversionError
from calm_dist.config.rules import query_groups
from calm_dist.config.schema import AutoencoderConfig, ModelConfig

AE_PREFIX_REFERENCE = "ae_model."
AE_PREFIX = "autoencoder."
# Buffers the reference may save that are not weights (recomputed from the config on both sides).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ReferenceFormatError(ConversionError):
    """Reference tensors that do not map onto the model their config describes."""


@dataclass(frozen=True)
class Rule:
    """One calm-dist tensor and where the reference keeps it.

    kind "copy": refs[0] holds it; `copies` are other reference names for the very same tensor
    (tied or registered twice), optional in a source and equal to it when present.
    kind "qkv": refs = (q, k, v), fused per key-value group. kind "cat": refs = (gate, up)."""

    ours: str
    shape: tuple[int, ...]
    refs: tuple[str, ...]
    kind: str = "copy"
    copies: tuple[str, ...] = ()
    heads: int = 0
    groups: int = 0


def _linear(ours: str, ref: str, out: int, inp: int, bias: bool) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", (out, inp), (f"{ref}.weight",))]
    return rules + ([Rule(f"{ours}.bias", (out,), (f"{ref}.bias",))] if bias else [])


def _norm(ours: str, ref: str, size: int, bias: bool) -> list[Rule]:
    return [Rule(f"{ours}.weight", (size,), (f"{ref}.weight",))] + (
        [Rule(f"{ours}.bias", (size,), (f"{ref}.bias",))] if bias else [])


def _ae_layer(ours: str, ref: str, d: int, f: int) -> list[Rule]:
    return [*_norm(f"{ours}.norm", f"{ref}.layernorm", d, False),
            *_linear(f"{ours}.mlp.gate_proj", f"{ref}.mlp.gate_proj", f, d, False),
            *_linear(f"{ours}.mlp.up_proj", f"{ref}.mlp.up_proj", f, d, False),
            *_linear(f"{ours}.mlp.down_proj", f"{ref}.mlp.down_proj", d, f, False)]


def autoencoder_rules(cfg: AutoencoderConfig, ours_prefix: str = "", ref_prefix: str = "") -> list[Rule]:
    """The autoencoder's rules (`cfg` validated); inside CALM the prefixes are autoencoder. / ae_model."""
    d, f, k, latent, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size, cfg.latent_size, cfg.vocab_size
    o, r = ours_prefix, ref_prefix
    enc_half, dec_half = cfg.num_encoder_layers // 2, cfg.num_decoder_layers // 2
    rules = [Rule(f"{o}embed_tokens.weight", (vocab, d), (f"{r}encoder.embed_tokens.weight",),
                  copies=(f"{r}decoder.lm_head_weight",))]
    for i in range(cfg.num_encoder_layers):
        ours = f"{o}encoder_token_layers.{i}" if i < enc_half else f"{o}encoder_chunk_layers.{i - enc_half}"
        rules += _ae_layer(ours, f"{r}encoder.encoder_layers.{i}", d, f)
    rules += [*_linear(f"{o}squeeze", f"{r}encoder.squeeze_layer", d, k * d, True),
              *_norm(f"{o}encoder_norm", f"{r}encoder.norm", d, False),
              *_linear(f"{o}latent_head", f"{r}encoder.hidden_to_latent", 2 * latent, d, True),
              *_linear(f"{o}decoder_in", f"{r}decoder.latent_to_hidden", d, latent, True)]
    for i in range(cfg.num_decoder_layers):
        ours = f"{o}decoder_chunk_layers.{i}" if i < dec_half else f"{o}decoder_token_layers.{i - dec_half}"
        rules += _ae_layer(ours, f"{r}decoder.decoder_layers.{i}", d, f)
    rules += [*_linear(f"{o}expand", f"{r}decoder.expand_layer", k * d, d, True),
              *_norm(f"{o}decoder_norm", f"{r}decoder.norm", d, False)]
    return rules


def _head_rules(m: ModelConfig, blocks: int) -> list[Rule]:
    d = m.hidden_size
    rules = [*_linear("head.noise_proj", "noise_embd", d, m.noise_size, True),
             *_norm("head.noise_norm", "norm_noise", d, True),
             *_linear("head.hidden_proj", "hidden_embd", d, d, True),
             *_norm("head.hidden_norm", "norm_hidden", d, True)]
    for j in range(blocks):
        rules += [*_norm(f"head.blocks.{j}.norm", f"mlp_blocks.{j}.in_ln", d, True),
                  *_linear(f"head.blocks.{j}.fuse", f"mlp_blocks.{j}.linears.0", d, 2 * d, True),
                  *_linear(f"head.blocks.{j}.mix", f"mlp_blocks.{j}.linears.2", d, d, True),
                  *_linear(f"head.blocks.{j}.gate_up", f"mlp_blocks.{j}.linears.4", 2 * d, d, True),
                  *_linear(f"head.blocks.{j}.down", f"mlp_blocks.{j}.down_proj", d, d, True)]
    rules += [*_norm("head.final_norm", "final_layer.in_ln", d, True),
              *_linear("head.final_hidden", "final_layer.linears.0", d, d, True),
              *_linear("head.output", "final_layer.linears.2", m.latent_size, d, True)]
    # The reference registers its head twice: mlp_generator (the name its code uses) and generative_head.
    return [Rule(r.ours, r.shape, (f"mlp_generator.{r.refs[0]}",), copies=(f"generative_head.{r.refs[0]}",))
            for r in rules]


def backbone_rules(m: ModelConfig, ref_prefix: str) -> list[Rule]:
    """The decoder's layers and final norm under Llama's names (`ref_prefix`: the reference CALM's
    "transformer.", Hugging Face's LlamaForCausalLM "model.")."""
    d, f, heads, groups = m.hidden_size, m.intermediate_size, m.num_attention_heads, query_groups(m)
    head_dim = d // heads
    rules = []
    for i in range(m.num_layers):
        o, r = f"backbone.decoder.layers.{i}", f"{ref_prefix}layers.{i}"
        rules += [*_norm(f"{o}.input_layernorm", f"{r}.input_layernorm", d, False),
                  Rule(f"{o}.self_attention.linear_qkv.weight", ((heads + 2 * groups) * head_dim, d),
                       (f"{r}.self_attn.q_proj.weight", f"{r}.self_attn.k_proj.weight", f"{r}.self_attn.v_proj.weight"),
                       kind="qkv", heads=heads, groups=groups),
                  *_linear(f"{o}.self_attention.linear_proj", f"{r}.self_attn.o_proj", d, heads * head_dim, False),
                  *_norm(f"{o}.pre_mlp_layernorm", f"{r}.post_attention_layernorm", d, False),
                  Rule(f"{o}.mlp.linear_fc1.weight", (2 * f, d),
                       (f"{r}.mlp.gate_proj.weight", f"{r}.mlp.up_proj.weight"), kind="cat"),
                  *_linear(f"{o}.mlp.linear_fc2", f"{r}.mlp.down_proj", d, f, False)]
    return rules + _norm("backbone.decoder.final_layernorm", f"{ref_prefix}norm", d, False)


def llama_causal_lm_rules(m: ModelConfig) -> list[Rule]:
    """The token baseline as Hugging Face's LlamaForCausalLM (untied embeddings): what the peers
    benchmark hands to transformers."""
    return [Rule("embed_tokens.weight", (m.vocab_size, m.hidden_size), ("model.embed_tokens.weight",)),
            *backbone_rules(m, "model."),
            Rule("lm_head.weight", (m.vocab_size, m.hidden_size), ("lm_head.weight",))]


def calm_rules(m: ModelConfig, ae: AutoencoderConfig, head_blocks: int, embedded_autoencoder: bool = True) -> list[Rule]:
    """CALM's rules (`m`, `ae` validated); `head_blocks` the energy head's residual blocks."""
    d = m.hidden_size
    rules = [Rule("embed_tokens.weight", (m.vocab_size, d), ("transformer.embed_tokens.weight",)),
             *_linear("compressor.fc1", "embed_proj.0", 2 * d, m.patch_size * d, True),
             *_linear("compressor.fc2", "embed_proj.2", d, 2 * d, True),
             *_norm("compressor.norm", "embed_proj.3", d, True)]
    rules += backbone_rules(m, "transformer.")
    rules += _head_rules(m, head_blocks)
    if embedded_autoencoder:
        rules += autoencoder_rules(ae, AE_PREFIX, AE_PREFIX_REFERENCE)
    return rules


def _reference_shapes(rule: Rule) -> list[tuple[int, ...]]:
    if rule.kind == "qkv":
        rows, cols = rule.shape
        head_dim = rows // (rule.heads + 2 * rule.groups)
        return [(rule.heads * head_dim, cols), (rule.groups * head_dim, cols), (rule.groups * head_dim, cols)]
    if rule.kind == "cat":
        rows, cols = rule.shape
        return [(rows // 2, cols), (rows // 2, cols)]
    return [rule.shape]


def _fuse_qkv(rule: Rule, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups, cols = rule.groups, q.shape[1]
    per_group = q.reshape(groups, -1, cols), k.reshape(groups, -1, cols), v.reshape(groups, -1, cols)
    return torch.cat(per_group, dim=1).reshape(-1, cols)


def _split_qkv(rule: Rule, qkv: torch.Tensor) -> list[torch.Tensor]:
    q_rows, k_rows, _ = (s[0] // rule.groups for s in _reference_shapes(rule))
    per_group = qkv.reshape(rule.groups, -1, qkv.shape[1])
    q, k, v = per_group.split([q_rows, k_rows, k_rows], dim=1)
    return [t.reshape(-1, qkv.shape[1]).contiguous() for t in (q, k, v)]


def _listed(kind: str, names: list[str], limit: int = 12) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{kind} ({len(names)}): {', '.join(names[:limit])}{more}"


def from_reference(rules: list[Rule], source: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """calm-dist's state dict from reference tensors, exactly; every problem listed in one error."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing, shapes, differ = [], [], []
    for rule in rules:
        if rule.kind == "copy" and rule.refs[0] not in source:
            # A save may keep any one copy of a tied or twice-registered tensor: take the first there is.
            held = next((c for c in rule.copies if c in source), None)
            if held is not None:
                rule = Rule(rule.ours, rule.shape, (held,), copies=tuple(c for c in (rule.refs[0], *rule.copies) if c != held))
        present = [name in source for name in rule.refs]
        if not all(present):
            missing += [name for name, here in zip(rule.refs, present) if not here]
            continue
        parts = [source[name] for name in rule.refs]
        wanted = _reference_shapes(rule)
        bad = [f"{name} {tuple(t.shape)} (expected {want})" for name, t, want in zip(rule.refs, parts, wanted)
               if tuple(t.shape) != want]
        used.update(rule.refs)
        for copy in rule.copies:
            if copy in source:
                used.add(copy)
                if tuple(source[copy].shape) != tuple(parts[0].shape) or not torch.equal(source[copy], parts[0]):
                    differ.append(f"{copy} != {rule.refs[0]}")
        if bad:
            shapes += bad
            continue
        if rule.kind == "qkv":
            out[rule.ours] = _fuse_qkv(rule, *parts)
        elif rule.kind == "cat":
            out[rule.ours] = torch.cat(parts, dim=0)
        else:
            out[rule.ours] = parts[0]
    unexpected = sorted(name for name in source if name not in used and not name.endswith(IGNORED_SUFFIXES))
    problems = [_listed(kind, names) for kind, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes),
                 ("tied or duplicated copies that differ", differ)) if names]
    if problems:
        raise ReferenceFormatError(f"{where} does not match the model its config.json describes: " + "; ".join(problems))
    return out


def to_reference(rules: list[Rule], ours: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Reference tensors (every copy name included) from calm-dist's state dict."""
    missing = [r.ours for r in rules if r.ours not in ours]
    wrong = [f"{r.ours} {tuple(ours[r.ours].shape)} (expected {r.shape})" for r in rules
             if r.ours in ours and tuple(ours[r.ours].shape) != r.shape]
    extra = sorted(set(ours) - {r.ours for r in rules})
    problems = [_listed(kind, names) for kind, names in
                (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if names]
    if problems:
        raise ReferenceFormatError(f"{where} does not match its config: " + "; ".join(problems))
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensor = ours[rule.ours]
        if rule.kind == "qkv":
            out.update(zip(rule.refs, _split_qkv(rule, tensor)))
        elif rule.kind == "cat":
            out.update(zip(rule.refs, (t.contiguous() for t in tensor.chunk(2, dim=0))))
        else:
            out[rule.refs[0]] = tensor
            out.update((copy, tensor) for copy in rule.copies)
    return out
