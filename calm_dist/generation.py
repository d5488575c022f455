"""KV-cached generation for CALM and the token baseline.

CALM emits one K-token chunk per model step, so it needs K times fewer steps than the baseline for
the same length. Each prompt is K-aligned by LEFT-padding it with at most K - 1 BOS tokens
(CALM.md §8.11): the reference right-pads with [PAD], which puts pads between prompt and
continuation, a position the model never saw in training, whereas a short run of BOS tokens reads
as empty documents, which concatenated training data does contain. Prompts are never padded to
each other's length: those of equal aligned length share a batch, the others run separately, so
no prompt's output depends on which prompts it was batched with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal, Sequence

import torch

from calm_dist.sampling.temperature import (
    batch_temperature_sample,
    exact_temperature_sample,
    parse_temperature,
)

SamplerName = Literal["exact", "batch"]


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # continuation per prompt, cut after the first EOS
    model_steps: int  # backbone forward calls (prompt prefill counts as one)
    collision_rates: list[float] = field(default_factory=list)  # batch sampler only (§9.12)
    sampler_draws: int = 0  # head samples drawn by the temperature sampler


def left_pad_prompts(prompts: Sequence[Sequence[int]], multiple: int, fill_id: int) -> torch.Tensor:
    """Left-pad every prompt with fill_id to one common length, a multiple of `multiple`."""
    if not prompts:
        raise ValueError("no prompts given")
    longest = max(max(len(p) for p in prompts), 1)
    length = -(-longest // multiple) * multiple
    return torch.tensor([[fill_id] * (length - len(p)) + list(p) for p in prompts], dtype=torch.long)


def aligned_groups(prompts: Sequence[Sequence[int]], multiple: int) -> dict[int, list[int]]:
    """Prompt indices grouped by their own aligned length (ceil to a multiple, at least one)."""
    if not prompts:
        raise ValueError("no prompts given")
    groups: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(max(1, -(-len(prompt) // multiple)) * multiple, []).append(i)
    return groups


def _per_group(generate_one, prompts, multiple: int, **kwargs) -> GenerationResult:
    """Run `generate_one` on each group of equally aligned prompts and restore the input order."""
    merged = GenerationResult(tokens=[[] for _ in prompts], model_steps=0)
    for indices in aligned_groups(prompts, multiple).values():
        part = generate_one([prompts[i] for i in indices], **kwargs)
        for i, tokens in zip(indices, part.tokens):
            merged.tokens[i] = tokens
        merged.model_steps = max(merged.model_steps, part.model_steps)  # steps one sequence took
        merged.collision_rates += part.collision_rates
        merged.sampler_draws += part.sampler_draws
    return merged


def _cut_at_eos(rows: torch.Tensor, eos_id: int | None, max_new_tokens: int) -> list[list[int]]:
    out = []
    for row in rows.tolist():
        row = row[:max_new_tokens]
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        out.append(row)
    return out


def generate_calm(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs) -> GenerationResult:
    """Sample continuations chunk by chunk. T = 1 draws one head sample per step; T < 1 uses the
    exact rejection sampler (any T) or the batch approximation (T = 1/n) over decoded chunks.
    Keyword arguments: temperature, sampler ('exact' | 'batch'), num_candidates, generator (the
    samplers' own uniforms; the head's noise comes from torch's default generator, so seed it with
    torch.manual_seed for reproducible text), eos_id."""
    return _per_group(_generate_calm_group, prompts, model.cfg.patch_size, model=model,
                      max_new_tokens=max_new_tokens, **kwargs)


@torch.no_grad()
def _generate_calm_group(
    prompts: Sequence[Sequence[int]],
    *,
    model,
    max_new_tokens: int,
    temperature: float | Fraction | str = 1.0,
    sampler: SamplerName = "exact",
    num_candidates: int = 200,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> GenerationResult:
    cfg = model.cfg
    k = cfg.patch_size
    n, frac = parse_temperature(temperature)
    if sampler == "batch" and frac != 0:
        raise ValueError(f"the batch sampler needs T = 1/n; T = {temperature}: use sampler='exact'")
    device = model.embed_tokens.weight.device
    prompt_BT = left_pad_prompts(prompts, k, cfg.bos_token_id).to(device)
    batch = prompt_BT.shape[0]
    new_steps = -(-max_new_tokens // k)
    cache = model.backbone.new_cache(batch, prompt_BT.shape[1] // k + new_steps)
    h_BD = model.hidden_states(prompt_BT, cache=cache)[:, -1]
    result = GenerationResult(tokens=[], model_steps=1)
    chunks = []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(new_steps):
        if n == 1 and frac == 0:
            chunk_BK = model.sample_chunks(h_BD, 1)[0]
        elif sampler == "batch":
            candidates_NBK = model.sample_chunks(h_BD, num_candidates)
            picks = [batch_temperature_sample(candidates_NBK[:, b], temperature, generator) for b in range(batch)]
            chunk_BK = torch.stack([p.sample for p in picks])
            result.collision_rates += [p.collision_rate for p in picks]
            result.sampler_draws += num_candidates * batch
        else:
            rows = []
            for b in range(batch):
                draw = lambda m, b=b: model.sample_chunks(h_BD[b : b + 1], m)[:, 0]  # noqa: E731
                sample, draws = exact_temperature_sample(draw, temperature, generator)
                rows.append(sample)
                result.sampler_draws += draws
            chunk_BK = torch.stack(rows)
        chunks.append(chunk_BK)
        if eos_id is not None:
            finished |= (chunk_BK == eos_id).any(dim=-1)
            if bool(finished.all()):
                break
        if step + 1 < new_steps:
            h_BD = model.hidden_states(chunk_BK, cache=cache)[:, -1]
            result.model_steps += 1
    result.tokens = _cut_at_eos(torch.cat(chunks, dim=1).cpu(), eos_id, max_new_tokens)
    return result


def generate_baseline(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_multiple: int = 1, **kwargs
) -> GenerationResult:
    """Token-by-token sampling from softmax(logits / T) with a KV cache. `pad_multiple=K` gives
    each prompt the same left padding as CALM sees, for like-for-like comparisons. Keyword
    arguments: temperature, generator, eos_id, greedy (the most likely token at every step)."""
    return _per_group(_generate_baseline_group, prompts, pad_multiple, model=model,
                      max_new_tokens=max_new_tokens, pad_multiple=pad_multiple, **kwargs)


@torch.no_grad()
def _generate_baseline_group(
    prompts: Sequence[Sequence[int]],
    *,
    model,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    pad_multiple: int = 1,
    greedy: bool = False,
) -> GenerationResult:
    if not 0 < float(temperature) <= 1:
        raise ValueError(f"temperature must be in (0, 1], got {temperature}")
    device = model.embed_tokens.weight.device
    prompt_BT = left_pad_prompts(prompts, pad_multiple, model.cfg.bos_token_id).to(device)
    batch = prompt_BT.shape[0]
    cache = model.backbone.new_cache(batch, prompt_BT.shape[1] + max_new_tokens)
    logits_BV = model.next_token_logits(prompt_BT, cache=cache)
    result = GenerationResult(tokens=[], model_steps=1)
    tokens = []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if greedy:
            next_B = logits_BV.argmax(dim=-1)
        else:
            probs_BV = torch.softmax(logits_BV.float() / float(temperature), dim=-1)
            next_B = torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
        tokens.append(next_B)
        if eos_id is not None:
            finished |= next_B == eos_id
            if bool(finished.all()):
                break
        if step + 1 < max_new_tokens:
            logits_BV = model.next_token_logits(next_B[:, None], cache=cache)
            result.model_steps += 1
    result.tokens = _cut_at_eos(torch.stack(tokens, dim=1).cpu(), eos_id, max_new_tokens)
    return result
