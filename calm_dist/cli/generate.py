"""Sample text from a trained CALM or token baseline (CALM.md §4).

    python -m calm_dist.cli.generate runs/tiny/calm --prompt "The state of the Union is" --seed 0
    python -m calm_dist.cli.generate converted/calm-m --prompts-file prompts.txt --num-samples 4 \\
        --temperature 1/3 --sampler batch --candidates 200 --out samples.jsonl

MODEL is anything `load_pretrained` accepts (a training run, its checkpoints, one checkpoint, a
converted directory). Prompts come from --prompt (repeatable) and from --prompts-file, one per
line (batch mode); each starts a document (BOS + prompt). Temperature for CALM: T = 1 draws one
head sample per step; the exact sampler takes any T in (0, 1], the batch sampler T = 1/n over
--candidates decoded chunks. The baseline samples softmax(logits / T).

Seeding: before each prompt, torch's default generator (CALM's head noise) and the sampling
generator (CALM's temperature samplers, the baseline's softmax draws) are seeded with --seed, so a
prompt's samples depend on the seed, the prompt and the options only, not on the other prompts.

Each sample becomes one JSON line: kind, prompt_index, prompt, sample, text (the continuation),
tokens_generated, model_steps (backbone calls of its batch), temperature, sampler (CALM: direct at
T = 1, exact or batch; baseline: softmax), candidates (batch sampler),
sampler_draws (head samples drawn by the temperature sampler for this prompt, divided by
--num-samples: exact for the batch sampler, a mean over the prompt's samples for the exact one),
collision_rate (batch sampler: the mean over this sample's steps), prompt_tokens (BOS included),
prompt_truncated (its start dropped to fit the model's positions), seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from fractions import Fraction
from pathlib import Path

import torch

from calm_dist.common.dist_env import resolve_device
from calm_dist.generation import generate_baseline, generate_calm
from calm_dist.sampling.temperature import parse_temperature

GENERATING_KINDS = ("calm", "baseline")


class GenerateInputError(ValueError):
    """Bad input: the command exits 2 with this message."""


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise GenerateInputError(f"{path}: no such prompts file")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise GenerateInputError(f"{path}: no prompts in it (one prompt per non-empty line)")
    if not prompts:
        raise GenerateInputError("no prompt given: use --prompt TEXT or --prompts-file FILE")
    return prompts


def parse_cli_temperature(text: str, sampler: str | None = None) -> Fraction:
    """T as an exact fraction ('0.5', '1/3'); CALM's batch sampler (sampler='batch') needs T = 1/n."""
    try:
        temperature = Fraction(text)
        _, fraction = parse_temperature(temperature)
    except (ValueError, ZeroDivisionError) as err:
        raise GenerateInputError(f"--temperature {text}: {err}") from None
    if sampler == "batch" and fraction != 0:
        raise GenerateInputError(f"--temperature {text}: the batch sampler needs T = 1/n (e.g. 1/2, 1/3); use "
                                 "--sampler exact for any T in (0, 1]")
    return temperature


def fit_prompt(ids: list[int], steps_limit: int, new_steps: int, step_tokens: int) -> tuple[list[int], bool]:
    """Keep the prompt's last tokens so that prompt and continuation fit the model's positions
    (new_steps < steps_limit, checked when the options are read)."""
    room = (steps_limit - new_steps) * step_tokens
    return (ids[-room:], True) if len(ids) > room else (ids, False)


class TextGenerator:
    """One loaded model and the sampling options; `samples(prompt)` gives its records."""

    def __init__(self, args: argparse.Namespace, pretrained):
        self.args, self.pre = args, pretrained
        self.model = pretrained.model
        self.cfg = self.model.cfg
        self.k = self.cfg.patch_size if pretrained.kind == "calm" else 1
        self.device = self.model.embed_tokens.weight.device
        sampler = args.sampler if pretrained.kind == "calm" else None  # the baseline has its exact softmax
        self.temperature = parse_cli_temperature(args.temperature, sampler)
        self.eos_id = None if args.ignore_eos else self.cfg.eos_token_id
        self.new_steps = -(-args.max_new_tokens // self.k)
        if self.new_steps >= self.cfg.max_position_embeddings:
            raise GenerateInputError(f"--max-new-tokens {args.max_new_tokens} needs {self.new_steps} model steps, "
                                     f"but the model has {self.cfg.max_position_embeddings} positions")

    def _sampler_name(self) -> str:
        if self.pre.kind == "baseline":
            return "softmax"
        return "direct" if self.temperature == 1 else self.args.sampler

    def _run(self, prompt_ids: list[int]):
        rows = [prompt_ids] * self.args.num_samples
        torch.manual_seed(self.args.seed)
        if self.pre.kind == "calm":
            generator = torch.Generator().manual_seed(self.args.seed)  # the samplers draw on the CPU
            return generate_calm(self.model, rows, self.args.max_new_tokens, temperature=self.temperature,
                                 sampler=self.args.sampler, num_candidates=self.args.candidates,
                                 generator=generator, eos_id=self.eos_id)
        generator = torch.Generator(device=self.device).manual_seed(self.args.seed)
        return generate_baseline(self.model, rows, self.args.max_new_tokens, temperature=float(self.temperature),
                                 generator=generator, eos_id=self.eos_id)

    def samples(self, index: int, prompt: str) -> list[dict]:
        tokenizer, n = self.pre.tokenizer, self.args.num_samples
        ids, truncated = fit_prompt([self.cfg.bos_token_id] + tokenizer.encode(prompt),
                                    self.cfg.max_position_embeddings, self.new_steps, self.k)
        result = self._run(ids)
        sampler = self._sampler_name()
        records = []
        for j, tokens in enumerate(result.tokens):
            rates = result.collision_rates[j::n]  # each step appends one rate per sample
            records.append({
                "kind": self.pre.kind, "prompt_index": index, "prompt": prompt, "sample": j,
                "text": tokenizer.decode(tokens), "tokens_generated": len(tokens),
                "model_steps": result.model_steps, "temperature": str(self.temperature), "sampler": sampler,
                "candidates": self.args.candidates if sampler == "batch" else None,
                "sampler_draws": result.sampler_draws / n,
                "collision_rate": sum(rates) / len(rates) if rates else None,
                "prompt_tokens": len(ids), "prompt_truncated": truncated, "seed": self.args.seed,
            })
        return records


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calm-generate", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a training run, checkpoint, or converted directory")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", default=None, help="a file with one prompt per line (batch mode)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--temperature", default="1", help="T in (0, 1], e.g. 0.5 or 1/3")
    parser.add_argument("--sampler", choices=("exact", "batch"), default="exact",
                        help="CALM at T < 1: exact rejection sampling (any T) or the batch approximation (T = 1/n)")
    parser.add_argument("--candidates", type=int, default=200, help="head samples per step for --sampler batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    parser.add_argument("--out", default=None, help="write the samples as JSON lines here")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    return parser


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("max_new_tokens", "num_samples", "candidates"):
        if getattr(args, name) < 1:
            raise GenerateInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def load_generator(args: argparse.Namespace) -> tuple[TextGenerator, list[str]]:
    """Everything that bad input can break, checked before any sampling."""
    # lazy: the models import megatron-core (~2.5 s); --help and usage errors don't wait for it
    from calm_dist.pretrained import load_pretrained

    _check_numbers(args)
    parse_cli_temperature(args.temperature)  # before the model loads; the sampler's rule needs its kind
    prompts = read_prompts(args)
    if not Path(args.model).exists():
        raise GenerateInputError(f"{args.model}: no such model (give a training run, checkpoint or converted "
                                 "directory)")
    device = resolve_device(args.device)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation talks; stdout is the texts'
        pre = load_pretrained(args.model, device=device)
    if pre.kind not in GENERATING_KINDS:
        raise GenerateInputError(f"{args.model} is an {pre.kind}, which does not generate text: give a CALM or "
                                 "baseline model")
    if pre.tokenizer is None:
        raise GenerateInputError(f"the tokenizer of {args.model} cannot be loaded (its config's data.tokenizer "
                                 f"= {pre.config.data.tokenizer!r})")
    return TextGenerator(args, pre), prompts


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        generator, prompts = load_generator(args)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"calm-generate: error: {message}", file=sys.stderr)
        return 2
    out = None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out = open(args.out, "w", encoding="utf-8")
    try:
        for index, prompt in enumerate(prompts):
            try:
                records = generator.samples(index, prompt)
            except RuntimeError as err:  # e.g. the exact sampler's draw budget at an extreme T
                print(f"calm-generate: error: prompt {index}: {str(err).splitlines()[0]}", file=sys.stderr)
                return 1
            for record in records:
                print(f"=== prompt {index}, sample {record['sample']}: {record['tokens_generated']} tokens in "
                      f"{record['model_steps']} model steps ===")
                print(prompt + record["text"], flush=True)
                if out is not None:
                    out.write(json.dumps(record) + "\n")
                    out.flush()  # samples so far survive an interruption
    finally:
        if out is not None:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
