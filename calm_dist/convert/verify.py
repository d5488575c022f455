"""Does a converted directory compute what its checkpoint computes? (the parity check users ask
for after every export)

Both models run on the same probe batch of random token blocks with torch seeded identically
before every forward: CALM compares its energy loss and chunks sampled from the head, the baseline
its cross-entropy and logits, the autoencoder its posterior means and their decoded tokens.
float32 must match bit for bit; bfloat16/float16 within a relative tolerance (sampled tokens are
then reported, not required to match: a rounded weight may flip an argmax).
"""

from __future__ import annotations

from pathlib import Path

import torch

from calm_dist.models.kinds import model_kind
from calm_dist.pretrained.converted import load_converted
from calm_dist.pretrained.loader import load_checkpoint_model

# Allowed max |a - b| relative to max(1, max |a|), per exported dtype.
TOLERANCE = {torch.float32: 0.0, torch.bfloat16: 5e-2, torch.float16: 1e-2}
PROBE_SEED = 1234


class VerificationError(RuntimeError):
    """The converted model does not reproduce the checkpoint's outputs."""


def probe_tokens(cfg, batch: int = 2, seed: int = PROBE_SEED) -> torch.Tensor:
    """A small batch of random token blocks the model's kind accepts."""
    generator = torch.Generator().manual_seed(seed)
    return model_kind(cfg.training.stage).probe_tokens(cfg, batch, generator)


@torch.no_grad()
def model_outputs(pre, tokens: torch.Tensor, seed: int = PROBE_SEED) -> dict[str, torch.Tensor]:
    """The outputs compared, each computed after seeding torch with `seed`."""
    return model_kind(pre.kind).probe_outputs(pre.model, tokens, seed)


def compare_outputs(reference: dict, converted: dict, dtype: torch.dtype) -> dict[str, str]:
    """A short report per output; raises VerificationError on a mismatch."""
    tolerance = TOLERANCE[dtype]
    report, problems = {}, []
    for name, ref in reference.items():
        got = converted[name]
        if not ref.is_floating_point():  # sampled or decoded token ids
            agree = (ref == got).float().mean().item()
            report[name] = f"{agree:.1%} equal"
            if dtype == torch.float32 and agree < 1.0:
                problems.append(f"{name}: only {agree:.2%} of the token ids agree (float32 must be exact)")
            continue
        diff = (ref - got).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        report[name] = f"max|diff| {diff:.3g}" if ref.numel() > 1 else f"{ref.item():.6g} vs {got.item():.6g}"
        if not diff <= tolerance * scale:  # also catches NaN
            problems.append(f"{name}: max |diff| {diff:.3g} exceeds {tolerance:g} x {scale:.3g} for {dtype}")
    if problems:
        raise VerificationError("the converted model does not reproduce the checkpoint: " + "; ".join(problems))
    return report


def verify_conversion(ref, converted_dir: Path, dtype: torch.dtype) -> dict[str, str]:
    """Load both sides, run the probe batch, compare; raises VerificationError on a mismatch."""
    reference = load_checkpoint_model(ref)
    converted = load_converted(converted_dir, allow_missing_tokenizer=True)
    tokens = probe_tokens(reference.config)
    report = compare_outputs(model_outputs(reference, tokens), model_outputs(converted, tokens), dtype)
    if reference.tokenizer is not None and converted.tokenizer is not None:
        if reference.tokenizer.fingerprint() != converted.tokenizer.fingerprint():
            raise VerificationError("the converted tokenizer.json differs from the run's tokenizer")
        report["tokenizer"] = "same"
    return report
