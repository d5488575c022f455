"""Synthetic sources: the generated stream obeys its law; the closed-form Brier levels agree with the
two-sample Brier estimator on the chain; the oracle's energy loss matches exact geometry; the CLI
writes shards, tokenizer and law that the loaders, the tokenizer check and the config accept."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
import torch

from calm_dist.config import load_config, validate
from calm_dist.data.index import check_tokenizer, load_index
from calm_dist.data.loader import build_train_loader, read_eval_blocks
from calm_dist.cli.prepare_data import main
from calm_dist.data.synthetic import (boundary_fraction, chunk_marginal_brier, continue_chain, make_source,
                                      optimal_brier, optimal_brierlm, oracle_energy_loss, sample_documents,
                                      transition_matrix, unconditional_brier)
from calm_dist.data.tokenizer import load_tokenizer
from calm_dist.ops.brier import calm_brier_terms

K = 4


def test_det_stream_follows_its_permutation():
    source = make_source("det", vocab=64, seed=3)
    docs = sample_documents(source, 20, 1000, np.random.default_rng(0))
    assert sorted(source.perm1) == list(range(64))
    assert np.array_equal(docs[:, 1:], source.perm1[docs[:, :-1]])


def test_markov_stream_switches_at_rate_q():
    q = 0.1
    source = make_source("markov", vocab=64, q=q, seed=5)
    assert sorted(source.perm2) == list(range(64)) and np.all(source.perm2 != source.perm1)
    docs = sample_documents(source, 50, 2000, np.random.default_rng(1))
    previous, following = docs[:, :-1], docs[:, 1:]
    switched = following == source.perm2[previous]
    assert np.all(switched | (following == source.perm1[previous]))
    transitions = switched.size
    bound = 5 * math.sqrt(q * (1 - q) / transitions)
    assert abs(switched.mean() - q) < bound
    first = np.bincount(docs[:, 0], minlength=64)  # the first token is not stuck
    assert (first > 0).sum() > 20


def test_closed_forms():
    markov, det = make_source("markov", vocab=64, q=0.1), make_source("det", vocab=64)
    assert optimal_brier(markov) == pytest.approx([0.82 ** n for n in range(1, 5)], rel=1e-12)
    assert optimal_brierlm(markov) == pytest.approx(100 * 0.82 ** 2.5, rel=1e-12)
    assert optimal_brier(det) == pytest.approx([1.0] * 4) and optimal_brierlm(det) == pytest.approx(100.0)
    assert unconditional_brier(markov) == pytest.approx([64.0 ** -n for n in range(1, 5)])
    assert chunk_marginal_brier(markov) == pytest.approx([0.82 ** (n - 1) / 64 for n in range(1, 5)])
    assert transition_matrix(markov).sum(axis=0) == pytest.approx(np.ones(64))  # doubly stochastic
    assert boundary_fraction(4096) == pytest.approx(8 / 4098)


def _mean_and_bound(terms: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    values = terms.numpy()
    return values.mean(axis=0), 4 * values.std(axis=0) / math.sqrt(len(values)) + 1e-12


@pytest.mark.parametrize("kind", ["det", "markov"])
def test_closed_forms_match_the_brier_estimator_on_the_chain(kind):
    """Chunk-aligned truths from a generated stream, scored with two samples from a predictor."""
    source = make_source(kind, vocab=16, q=0.25, seed=7)
    rng = np.random.default_rng(2)
    docs = sample_documents(source, 4000, 4 * 100 + 1, rng)
    previous = docs[:, 0:-1:K].reshape(-1)
    truth = torch.from_numpy(np.stack([docs[:, 1 + i::K] for i in range(K)], axis=-1).reshape(-1, K))

    def terms(draw):
        return calm_brier_terms(torch.from_numpy(draw()), torch.from_numpy(draw()), truth)

    def uniform_previous():
        return rng.integers(0, source.vocab, len(previous))

    predictors = {  # each draws one sample per position from its predictive law
        "optimal": (optimal_brier, lambda: continue_chain(source, previous, K, rng)),
        "chunk_marginal": (chunk_marginal_brier, lambda: continue_chain(source, uniform_previous(), K, rng)),
        "unconditional": (unconditional_brier, lambda: rng.integers(0, source.vocab, (len(previous), K))),
    }
    for name, (closed_form, draw) in predictors.items():
        mean, bound = _mean_and_bound(terms(draw))
        assert np.all(np.abs(mean - closed_form(source)) <= bound), (name, mean, closed_form(source))


def test_oracle_energy_loss_of_a_deterministic_source_is_the_posterior_spread():
    """det: the oracle predicts the true chunk's posterior, so its loss is E||Y - Y'|| of
    N(mu, s^2 I_D): s * 2 Gamma((D+1)/2) / Gamma(D/2)."""
    d, s = 6, 0.3
    table = torch.randn(16, d, generator=torch.Generator().manual_seed(0))

    def encode(chunks_BCK):
        mu = table[chunks_BCK].flatten(-2)
        return mu, torch.full_like(mu, math.log(s))

    dim = K * d
    expected = s * 2 * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))
    loss = oracle_energy_loss(make_source("det", vocab=16), encode, positions=1024)
    assert loss == pytest.approx(expected, rel=0.02)
    assert oracle_energy_loss(make_source("det", vocab=16), encode, positions=1024) == loss  # seeded


def test_oracle_energy_loss_of_markov_chunks_with_one_hot_latents():
    """Nearly noiseless one-hot latents: the loss is E||mu_c - mu_c'|| = E sqrt(2 * Hamming(c, c'))
    over two chunks drawn independently after the same previous token, enumerated exactly."""
    source = make_source("markov", vocab=8, q=0.3, seed=1)

    def encode(chunks_BCK):
        mu = torch.nn.functional.one_hot(chunks_BCK, source.vocab).float().flatten(-2)
        return mu, torch.full_like(mu, math.log(1e-4))

    expected = 0.0
    for first in range(source.vocab):
        chunks = []
        for switches in itertools.product([False, True], repeat=K):
            token, chunk = first, []
            for switch in switches:
                token = int((source.perm2 if switch else source.perm1)[token])
                chunk.append(token)
            chunks.append((np.array(chunk), math.prod(source.q if w else 1 - source.q for w in switches)))
        expected += sum(pa * pb * math.sqrt(2 * np.sum(a != b)) for (a, pa), (b, pb) in
                        itertools.product(chunks, repeat=2)) / source.vocab
    loss = oracle_energy_loss(source, encode, positions=4096)
    assert loss == pytest.approx(expected, abs=0.05)


def test_oracle_energy_loss_takes_an_autoencoders_encode():
    from calm_dist.models.autoencoder import Autoencoder

    cfg = validate(load_config(["tiny_autoencoder"], ["model.vocab_size=66", "model.pad_token_id=65",
                                                      "model.bos_token_id=64", "model.eos_token_id=64"]))
    torch.manual_seed(0)
    autoencoder = Autoencoder(cfg.autoencoder).eval()
    loss = oracle_energy_loss(make_source("markov"), autoencoder.encode, positions=32, num_samples=4, num_targets=4)
    assert math.isfinite(loss) and loss > 0


# the command line ------------------------------------------------------------------------------

SMALL = ["--synthetic-tokens", "20000", "--synthetic-doc-tokens", "512", "--shard-tokens", "4096"]


def test_cli_writes_shards_tokenizer_and_law_the_trainer_accepts(tmp_path, capsys):
    out = tmp_path / "markov"
    assert main([str(out), "--synthetic", "markov", "--seed", "4", *SMALL]) == 0
    printed = capsys.readouterr().out
    law = json.loads((out / "synthetic.json").read_text())
    source = make_source("markov", seed=4)
    assert law["perm1"] == source.perm1.tolist() and law["perm2"] == source.perm2.tolist()
    assert law["optimal_brier"] == pytest.approx(optimal_brier(source))
    assert law["optimal_brierlm"] == pytest.approx(optimal_brierlm(source))

    tokenizer = load_tokenizer(out / "tokenizer.json")
    for split in ("train", "valid"):
        check_tokenizer(out / split, tokenizer)  # raises on another fingerprint
    index = load_index(out / "train")
    assert (index.vocab_size, index.bos_id, index.eos_id, index.pad_id) == (66, 64, 64, 65)
    assert (index.docs, index.tokens, len(index.shards)) == (40, 40 * 512, 5)

    # the printed overrides make a valid config whose model fields are the shards'
    overrides = re.search(r"train with: (.*)", printed).group(1).split()
    cfg = validate(load_config(["tiny_calm"], overrides))
    assert (cfg.model.vocab_size, cfg.model.bos_token_id, cfg.model.eos_token_id, cfg.model.pad_token_id) == \
        (index.vocab_size, index.bos_id, index.eos_id, index.pad_id)
    assert load_tokenizer(cfg.data.tokenizer).fingerprint() == index.tokenizer_fingerprint

    def assert_follows_law(stream: np.ndarray):
        pairs = np.stack([stream[:-1], stream[1:]], axis=1)
        pairs = pairs[(pairs < source.vocab).all(axis=1)]  # specials are outside the law
        ok = (pairs[:, 1] == source.perm1[pairs[:, 0]]) | (pairs[:, 1] == source.perm2[pairs[:, 0]])
        assert len(pairs) > 40 and ok.all()

    loader = build_train_loader(out / "train", 68, 4, 0, 1, 0, seed=0, tokenizer=tokenizer)
    epoch = np.concatenate([next(loader).numpy() for _ in range(loader.batches_per_epoch())])
    assert epoch.shape[1] == 68 and (epoch == index.bos_id).sum() >= 30  # one BOS per document read
    for block in epoch:  # blocks of a batch come from several streams: check each alone
        assert_follows_law(block)
    blocks = read_eval_blocks(out / "valid", 68, tokenizer=tokenizer).numpy()
    stream = blocks.reshape(-1)
    assert_follows_law(stream)
    first_doc = stream[1:513]
    assert stream[0] == index.bos_id and stream[513] == index.eos_id
    assert tokenizer.encode(tokenizer.decode(first_doc)) == first_doc.tolist()
    assert tokenizer.decode(first_doc[:3]) == " ".join(f"s{t}" for t in first_doc[:3])

    assert main([str(out), "--synthetic", "markov", "--seed", "4", *SMALL]) == 0  # done: left alone
    assert "already prepared" in capsys.readouterr().out
    assert main([str(out), "--synthetic", "markov", "--seed", "5", *SMALL]) == 1  # another law
    assert "--overwrite" in capsys.readouterr().err
    assert load_tokenizer(out / "tokenizer.json").fingerprint() == index.tokenizer_fingerprint


@pytest.mark.parametrize("args, option", [
    (["--synthetic", "det", "--vocab-size", "1"], "--vocab-size"),
    (["--synthetic", "markov", "--synthetic-q", "1.5"], "--synthetic-q"),
    (["--synthetic", "markov", "--synthetic-q", "0"], "--synthetic-q"),
    (["--synthetic", "det", "--synthetic-doc-tokens", "1"], "--synthetic-doc-tokens"),
    (["--synthetic", "det", "--seed", "-1"], "--seed"),
])
def test_bad_values_name_their_option(tmp_path, capsys, args, option):
    assert main([str(tmp_path / "out"), *args]) == 1
    assert option in capsys.readouterr().err
    assert not (tmp_path / "out" / "train").exists()


def test_an_unknown_source_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--synthetic", "zipf"])
    assert "--synthetic" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--synthetic"):
        make_source("zipf")


def test_the_main_successor_is_one_cycle_through_every_token():
    """Irreducible chain: from any token, perm1 visits all V tokens before returning."""
    from calm_dist.data.synthetic import make_source

    for kind in ("det", "markov"):
        for seed in range(5):
            source = make_source(kind, vocab=16, seed=seed)
            token, seen = 0, set()
            for _ in range(16):
                seen.add(token)
                token = int(source.perm1[token])
            assert token == 0 and len(seen) == 16
