"""The default end-to-end job, on CPU, on the bundled corpus:

  1. prepare shards: a 4,096-token BPE trained on the bundled speeches, train/valid shards;
  2. stage 1: train a tiny autoencoder (DeepSpeed ZeRO-3, like any run);
  3. stage 2: train a tiny CALM on the frozen autoencoder;
  4. the token baseline beside it, trained for the same training FLOPs (--no-baseline skips it);
  5. evaluate: reconstruction accuracy, CALM's energy against the unconditional level (the gap
     says whether it uses its context; docs/learning.md), Brier-1..4 and BrierLM of both models;
  6. generate a sample from a prompt.

    python -m calm_dist.quickstart                 # about 30 minutes on 2 cores
    python -m calm_dist.quickstart --preset demo   # about 1.5 hours: as far as a CPU goes
    python -m calm_dist.quickstart --steps-scale 0.1 --out runs/smoke   # a quick smoke run

Each stage is an ordinary `python -m calm_dist.train` run in its own process (the command is
printed), so everything here can be repeated by hand, resumed, or launched with torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from calm_dist.common.job_log import HARMLESS_WARNINGS
from calm_dist.config import load_config
from calm_dist.config.validate import validate
from calm_dist.data.tokenizer import load_tokenizer
from calm_dist.training.metrics import read_metrics

PRESETS = {  # (autoencoder, CALM, token baseline)
    "quickstart": ("quickstart_autoencoder", "quickstart_calm", "quickstart_baseline"),
    "demo": ("demo_autoencoder", "demo_calm", "demo_baseline"),
}
STAGES = 6
PROMPT = "The state of the Union is"


def _banner(step: int, text: str) -> None:
    print(f"\n[{step}/{STAGES}] {text}", flush=True)


def _train(preset: str, overrides: list[str], steps_scale: float, log_file: Path, steps: int | None = None) -> None:
    cfg = load_config([preset])
    steps = steps or max(2, int(cfg.training.train_steps * steps_scale))
    steps_scale = steps / cfg.training.train_steps
    scaled = [f"training.train_steps={steps}",
              f"training.save_interval={max(1, int(cfg.training.save_interval * steps_scale))}",
              f"training.eval_interval={max(1, int(cfg.training.eval_interval * steps_scale))}",
              f"logging.log_interval={max(1, min(cfg.logging.log_interval, steps // 10 or 1))}"]
    if steps_scale != 1:  # a shorter run keeps the recipe's proportions: warm-up and head-first delay
        opt = cfg.optimizer
        scaled.append(f"optimizer.warmup_steps={int(opt.warmup_steps * steps_scale)}")
        if opt.lr_delay_steps:
            delays = ", ".join(f"{g}: {int(d * steps_scale)}" for g, d in opt.lr_delay_steps.items())
            scaled.append(f"optimizer.lr_delay_steps={{{delays}}}")
    cmd = [sys.executable, "-m", "calm_dist.train", "--config", preset, *overrides, *scaled]
    print("  $ " + " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        for line in proc.stdout:  # the trainer's progress lines, as they come
            print("  " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"training with {preset} failed (exit {proc.returncode}); see {log_file}")


def _last_eval(run_dir: Path) -> dict:
    last = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        if record.get("kind") == "eval":
            last = record
    return last


def summarize(ae_run: Path, calm_run: Path, baseline_run: Path | None = None) -> dict:
    """The summary's figures: each run's final in-training evaluation, which scores its held-out
    blocks with calm-eval's scorer and seed rule (`calm-eval RUN --seed <training.seed>` on the same
    blocks gives the same numbers)."""
    ae_eval, calm_eval = _last_eval(ae_run), _last_eval(calm_run)
    summary = {
        "autoencoder_recon_acc": ae_eval.get("recon_acc"),
        "calm_energy_loss": calm_eval.get("loss"),
        "unconditional_energy_loss": calm_eval.get("uncond"),
        "energy_gap_pct": calm_eval.get("gap_pct"),
        **{k: calm_eval.get(k) for k in ("brier1", "brier2", "brier3", "brier4", "brierlm")},
    }
    if baseline_run is not None:
        baseline_eval = _last_eval(baseline_run)
        summary["baseline"] = {k: baseline_eval.get(k) for k in
                               ("loss", "ppl", "brier1", "brier2", "brier3", "brier4", "brierlm")}
    return summary


def equal_flops_steps(calm_preset: str, baseline_preset: str, calm_steps: int, overrides: list[str]) -> int:
    """Baseline steps whose training FLOPs equal CALM's over `calm_steps` (calm_dist/flops.py)."""
    from calm_dist.flops import training_flops_per_token  # lazy: imports the models (megatron-core, ~3 s)

    def per_step(preset: str) -> float:
        cfg = validate(load_config([preset], overrides))
        return training_flops_per_token(cfg) * cfg.derived.global_batch_size * cfg.data.seq_length

    return max(2, round(calm_steps * per_step(calm_preset) / per_step(baseline_preset)))


def _brier_line(metrics: dict) -> str:
    return (f"BrierLM {metrics['brierlm']:.2f} (Brier-1..4: "
            + ", ".join(f"{metrics[f'brier{n}']:.4f}" for n in range(1, 5)) + ")")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="calm-quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
    parser.add_argument("--out", default="runs/quickstart", help="output directory (reused: stages resume)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on the corpus")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the token baseline of equal training FLOPs trained beside CALM")
    args = parser.parse_args(argv)
    for pattern in HARMLESS_WARNINGS:  # the in-process steps (summary, generation); the stages set their own
        warnings.filterwarnings("ignore", message=pattern)
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ae_preset, calm_preset, baseline_preset = PRESETS[args.preset]

    _banner(1, "prepare data: BPE tokenizer + WebDataset shards of the bundled corpus")
    # lazy: torch and webdataset (~1.5 s); --help needs neither
    from calm_dist.data.prepare import prepare_bundled_corpus

    data = prepare_bundled_corpus(out / "data", vocab_size=args.vocab_size)
    print(f"  train {data.train.tokens:,} tokens in {len(data.train.shards)} shards, valid {data.valid.tokens:,} "
          f"tokens; tokenizer {data.tokenizer_path}", flush=True)
    common = [f"data.train_path={data.train.directory}", f"data.valid_path={data.valid.directory}",
              f"data.tokenizer={data.tokenizer_path}", f"model.vocab_size={data.train.vocab_size}",
              f"model.pad_token_id={data.train.pad_id}", f"model.bos_token_id={data.train.bos_id}",
              f"model.eos_token_id={data.train.eos_id}"]

    _banner(2, "stage 1: train the autoencoder")
    ae_run = out / "autoencoder"
    _train(ae_preset, common + [f"training.output_dir={ae_run}"], args.steps_scale, out / "autoencoder.log")

    _banner(3, "stage 2: train CALM on the frozen autoencoder")
    calm_run = out / "calm"
    _train(calm_preset, common + [f"training.output_dir={calm_run}", f"training.autoencoder_path={ae_run / 'autoencoder'}"],
           args.steps_scale, out / "calm.log")

    baseline_eval = None
    if not args.no_baseline:
        calm_steps = max(2, int(load_config([calm_preset]).training.train_steps * args.steps_scale))
        steps = equal_flops_steps(calm_preset, baseline_preset, calm_steps, common)
        _banner(4, f"the token baseline beside it: {steps} steps, the training FLOPs of CALM's {calm_steps}")
        baseline_run = out / "baseline"
        _train(baseline_preset, common + [f"training.output_dir={baseline_run}"], args.steps_scale,
               out / "baseline.log", steps=steps)
        baseline_eval = _last_eval(baseline_run)

    _banner(5, "evaluate (held-out blocks, the trainers' own final evaluation: the figures calm-eval gives)")
    calm_eval = _last_eval(calm_run)
    summary = summarize(ae_run, calm_run, baseline_run if baseline_eval else None)
    print(f"  autoencoder: held-out token accuracy {summary['autoencoder_recon_acc']:.2%} "
          "(decoding a posterior sample)")
    print(f"  CALM: held-out energy loss {summary['calm_energy_loss']:.3f} vs {summary['unconditional_energy_loss']:.3f} "
          f"for an unconditional predictor: {summary['energy_gap_pct']:.1f}% below it (below = the model uses its "
          "context; docs/learning.md)")
    print(f"  CALM: {_brier_line(calm_eval)}")
    if baseline_eval:
        print(f"  token baseline (equal training FLOPs): CE {baseline_eval['loss']:.3f}, {_brier_line(baseline_eval)}")

    _banner(6, "generate")
    # lazy: torch and megatron-core (~3 s); the training stages ran in their own processes
    import torch

    from calm_dist.generation import generate_calm
    from calm_dist.pretrained import load_pretrained

    trained = load_pretrained(calm_run)  # the newest checkpoint, consolidated on this CPU
    model, cfg = trained.model, trained.config
    tokenizer = load_tokenizer(data.tokenizer_path)
    torch.manual_seed(0)
    result = generate_calm(model, [tokenizer.encode(PROMPT)], max_new_tokens=48, eos_id=tokenizer.eos_id)
    text = PROMPT + tokenizer.decode(result.tokens[0])
    print(f"  {text!r}\n  ({len(result.tokens[0])} tokens in {result.model_steps} model steps: one per chunk of "
          f"K = {cfg.model.patch_size})")
    (out / "sample.txt").write_text(text + "\n")
    summary.update({"sample": text, "model_steps": result.model_steps, "minutes": (time.time() - start) / 60})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\ndone in {summary['minutes']:.1f} min; outputs in {out}/ (summary.json, sample.txt, "
          "autoencoder/ and calm/ runs with metrics.jsonl, TensorBoard logs and checkpoints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
