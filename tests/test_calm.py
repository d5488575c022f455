"""CALM and the token baseline built from real megatron-core layers on CPU: parameter counts of the
paper presets, the decisions of CALM.md §9 (init, frozen clean autoencoder, head input), training
on real text, and KV-cached generation with K times fewer model steps."""

from __future__ import annotations

import pytest
import torch

from calm_dist.config import load_config, validate
from calm_dist.generation import generate_baseline, generate_calm, left_pad_prompts
from calm_dist.ops.brier import BrierAccumulator
from calm_dist.evaluation.scorer import metrics_from, score_blocks
from calm_dist.models.scoring import (
    baseline_next_token_probs,
    calm_block_terms,
    recomputed_next_token_probs,
    rollout_tree,
    score_baseline_block,
    score_baseline_blocks,
    tree_next_token_probs,
)
from calm_dist.models.shared_context import SharedContext
from calm_dist.models.autoencoder import Autoencoder
from calm_dist.models.baseline import TokenBaseline
from calm_dist.models.calm import CALM, unconditional_energy
from calm_dist.models.param_counts import baseline_param_count, calm_param_count
from calm_dist.parallel.state import ensure_model_parallel

# Derived in CALM.md §2.3 (millions; CALM without its frozen autoencoder).
PAPER_PARAMS = {
    "calm_m": 371.7, "calm_l": 735.3, "calm_xl": 1829.8,
    "transformer_s": 282.0, "transformer_m": 465.1, "transformer_l": 847.0,
}


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    ensure_model_parallel()


def tiny_cfg(vocab: int = 97, pad: int = 96, **model):
    overrides = [f"model.vocab_size={vocab}", f"model.pad_token_id={pad}", "model.bos_token_id=0",
                 "model.eos_token_id=0", "model.num_layers=2", "model.hidden_size=64",
                 "model.intermediate_size=172", "data.seq_length=32", "autoencoder.hidden_size=64",
                 "autoencoder.intermediate_size=160", "autoencoder.latent_size=32", "model.latent_size=32"]
    overrides += [f"model.{k}={v}" for k, v in model.items()]
    return validate(load_config(["tiny_calm"], overrides))


@pytest.mark.parametrize("preset", sorted(PAPER_PARAMS))
def test_paper_presets_reproduce_parameter_counts(preset):
    cfg = validate(load_config([preset]))
    count = calm_param_count(cfg.model) if preset.startswith("calm") else baseline_param_count(cfg.model)
    assert round(count / 1e6, 1) == PAPER_PARAMS[preset]


def test_calm_m_built_for_real_has_the_paper_parameter_count():
    cfg = validate(load_config(["calm_m"], ["model.attention_backend=sdpa"]))
    ae = Autoencoder(cfg.autoencoder)
    model = CALM(cfg.model, ae)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert trainable == calm_param_count(cfg.model)
    assert round(trainable / 1e6, 1) == 371.7
    assert round(frozen / 1e6, 1) == 75.8  # the reference autoencoder, frozen
    # Head ~7-9% of the parameters (CALM.md §2.4).
    assert 0.07 < sum(p.numel() for p in model.head.parameters()) / trainable < 0.09


def test_tiny_models_match_their_formulas():
    cfg = tiny_cfg()
    model = CALM(cfg.model, Autoencoder(cfg.autoencoder))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == calm_param_count(cfg.model)
    baseline = TokenBaseline(cfg.model)
    assert sum(p.numel() for p in baseline.parameters()) == baseline_param_count(cfg.model)


def test_initialisation_follows_the_decisions():
    torch.manual_seed(0)
    cfg = validate(load_config(["tiny_calm"], ["model.vocab_size=4097"]))
    model = CALM(cfg.model, Autoencoder(cfg.autoencoder))
    for name, weight in [("embed", model.embed_tokens.weight), ("compressor", model.compressor.fc1.weight),
                         ("head fuse", model.head.blocks[0].fuse.weight), ("head noise", model.head.noise_proj.weight)]:
        assert abs(weight.std().item() - 0.02) < 0.002, name
    assert torch.all(model.head.output.weight == 0) and torch.all(model.head.output.bias == 0)
    assert torch.all(model.head.blocks[0].fuse.bias == 0)
    assert torch.all(model.compressor.norm.weight == 1)
    # Zero output layer: every sample coincides at init, so only the fidelity term has gradient.
    h = torch.randn(5, cfg.model.hidden_size)
    samples = model.sample_latents(h, 8)
    assert torch.all(samples == samples[0])


def test_autoencoder_stays_frozen_and_clean(sotu_bpe_1k):
    cfg = tiny_cfg()
    ae = Autoencoder(cfg.autoencoder)
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    model = CALM(cfg.model, ae).train()
    assert not ae.training and all(not p.requires_grad for p in ae.parameters())
    tokens = torch.randint(0, 96, (2, cfg.derived.block_tokens))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = model(tokens)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(p.grad is None for p in ae.parameters())
    assert all(torch.equal(before[k], v) for k, v in ae.state_dict().items())
    assert torch.isfinite(out.loss) and out.diversity > 0  # samples spread after one step


def test_head_noise_is_uniform_on_minus_half_to_half():
    cfg = tiny_cfg()
    model = CALM(cfg.model, Autoencoder(cfg.autoencoder))
    seen = []
    model.head.noise_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    torch.manual_seed(0)
    model.sample_latents(torch.randn(500, cfg.model.hidden_size), 8)
    noise = seen[0]
    assert noise.shape == (8, 500, 64)
    assert noise.min() >= -0.5 and noise.max() <= 0.5
    assert abs(noise.var().item() - 1 / 12) < 0.002 and abs(noise.mean().item()) < 0.005


def test_head_reads_the_backbone_state_after_its_final_norm():
    cfg = tiny_cfg()
    model = CALM(cfg.model, Autoencoder(cfg.autoencoder))
    seen = []
    model.head.hidden_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model(torch.randint(0, 96, (1, cfg.derived.block_tokens)))
    h = seen[0]
    rms = h.pow(2).mean(-1).sqrt()  # unit RMS: the final RMSNorm (weight 1 at init) was applied
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)


def test_energy_loss_is_chunked_without_changing_its_value():
    """Targets drawn chunk by chunk (to bound memory) give exactly the loss of one unchunked call
    on the same samples and targets."""
    from calm_dist.ops.energy import energy_loss

    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = CALM(cfg.model, Autoencoder(cfg.autoencoder)).eval()
    model.cfg.energy_chunk_positions = 3
    tokens = torch.randint(0, 96, (2, cfg.derived.block_tokens))
    torch.manual_seed(1)
    chunked = model(tokens)
    # Replay the same random stream by hand, then score everything in one call.
    with torch.no_grad():
        h = model.hidden_states(tokens[:, :-4]).reshape(-1, cfg.model.hidden_size)
        mu, log_sigma = model.target_posterior(tokens[:, 4:].reshape(2, -1, 4))
    mu, sigma = mu.reshape(-1, mu.shape[-1]), log_sigma.reshape(-1, mu.shape[-1]).exp()
    torch.manual_seed(1)
    samples = model.sample_latents(h, cfg.model.num_samples)
    eps = [torch.randn(cfg.model.num_target_samples, min(3, 16 - s), mu.shape[-1]) for s in range(0, 16, 3)]
    targets = mu + sigma * torch.cat(eps, dim=1)
    whole = energy_loss(samples, targets, beta=cfg.model.beta, chunk_positions=10**6)
    assert chunked.num_positions == 16
    assert chunked.loss.item() == pytest.approx(whole.loss.item(), rel=1e-5)
    assert chunked.fidelity.item() == pytest.approx(whole.fidelity.item(), rel=1e-5)


@pytest.fixture(scope="module")
def trained_pair(sotu_bpe_1k):
    """A briefly trained tiny autoencoder and a tiny CALM trained on it, with their eval losses."""
    tok, train_ids, held_ids = sotu_bpe_1k
    cfg = validate(load_config(["tiny_calm"], [
        f"model.vocab_size={tok.vocab_size}", f"model.pad_token_id={tok.pad_id}",
        f"model.bos_token_id={tok.bos_id}", f"model.eos_token_id={tok.eos_id}", "model.num_layers=2",
        "model.hidden_size=128", "model.intermediate_size=344", "data.seq_length=128",
        "autoencoder.hidden_size=128", "autoencoder.intermediate_size=320",
    ]))
    torch.manual_seed(0)
    train, held = torch.tensor(train_ids), torch.tensor(held_ids)
    ae = Autoencoder(cfg.autoencoder)
    chunks = train[: len(train) // 4 * 4].view(-1, 4)
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(250):
        out = ae(chunks[torch.randint(0, len(chunks), (256,))][None])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model = CALM(cfg.model, ae.eval())
    block = cfg.derived.block_tokens
    gen = torch.Generator().manual_seed(1)
    val = torch.stack([held[i : i + block] for i in torch.randint(0, len(held) - block, (16,), generator=gen)])

    def eval_loss() -> float:
        model.eval()
        torch.manual_seed(123)
        with torch.no_grad():
            loss = model(val).loss.item()
        model.train()
        return loss

    losses = [eval_loss()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    for step in range(1, 151):
        batch = torch.stack([train[i : i + block] for i in torch.randint(0, len(train) - block, (8,))])
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            losses.append(eval_loss())
    torch.manual_seed(7)
    return tok, model.eval(), val, losses, unconditional_energy(model, val)


def test_tiny_calm_energy_loss_falls_on_real_text(trained_pair):
    """The held-out energy loss falls from the zero-initialised head's level to about the level of
    an unconditional predictor: what 150 CPU steps reach (docs/learning.md: beating it takes far
    longer)."""
    *_, losses, marginal = trained_pair  # held-out energy loss at steps 0, 50, 100, 150
    assert losses[-1] < 0.85 * losses[0], (losses, marginal)
    assert losses[-1] < losses[1], (losses, marginal)
    assert losses[0] > 1.2 * marginal and losses[-1] < 1.1 * marginal, (losses, marginal)


def test_calm_generation_takes_k_times_fewer_steps(trained_pair):
    tok, model, *_ = trained_pair
    prompts = [tok.encode("The state of the Union is"), tok.encode("My fellow citizens")]
    torch.manual_seed(0)
    out = generate_calm(model, prompts, max_new_tokens=32)
    assert [len(t) for t in out.tokens] == [32, 32]
    assert out.model_steps == 32 // 4  # prefill + 7 cached steps: one per chunk
    baseline = TokenBaseline(model.cfg).eval()
    base = generate_baseline(baseline, prompts, max_new_tokens=32)
    assert base.model_steps == 32
    assert isinstance(tok.decode(out.tokens[0]), str)


def test_cached_generation_equals_full_recompute(trained_pair):
    _, model, val, *_ = trained_pair
    prompt = val[:2, :16]
    torch.manual_seed(5)
    cached = generate_calm(model, prompt.tolist(), max_new_tokens=12)
    # Recompute from scratch each step with the same noise stream: same chunks.
    torch.manual_seed(5)
    tokens = prompt.clone()
    for _ in range(3):
        h = model.hidden_states(tokens)[:, -1]
        tokens = torch.cat([tokens, model.sample_chunks(h, 1)[0]], dim=1)
    assert cached.tokens == tokens[:, 16:].tolist()


@pytest.mark.parametrize("temperature,sampler", [(0.5, "batch"), (0.5, "exact"), (0.6, "exact")])
def test_generation_at_a_temperature(trained_pair, temperature, sampler):
    _, model, val, *_ = trained_pair
    torch.manual_seed(0)
    out = generate_calm(model, val[:1, :8].tolist(), max_new_tokens=8, temperature=temperature,
                        sampler=sampler, num_candidates=64, generator=torch.Generator().manual_seed(0))
    assert len(out.tokens[0]) == 8 and out.sampler_draws > 0
    if sampler == "batch":
        assert len(out.collision_rates) == 2 and all(0 <= r <= 1 for r in out.collision_rates)


def test_batch_sampler_refuses_fractional_inverse_temperature(trained_pair):
    _, model, val, *_ = trained_pair
    with pytest.raises(ValueError, match="1/n"):
        generate_calm(model, val[:1, :8].tolist(), max_new_tokens=4, temperature=0.6, sampler="batch")


def test_prompts_are_k_aligned_by_left_padding_with_bos():
    padded = left_pad_prompts([[5, 6, 7], [1, 2, 3, 4, 5]], multiple=4, fill_id=0)
    assert padded.tolist() == [[0, 0, 0, 0, 0, 5, 6, 7], [0, 0, 0, 1, 2, 3, 4, 5]]


def test_calm_brier_scores_each_position_against_the_next_chunk(trained_pair):
    """With samples replaced by the true next chunk BrierLM is 100; by the chunk just read it is
    (almost) 0: the estimator's alignment cannot be off by one chunk."""
    _, model, val, *_ = trained_pair
    blocks = val[:2]
    truth = blocks[:, 4:].reshape(-1, 4)
    previous = blocks[:, :-4].reshape(-1, 4)
    for samples, expected in ((truth, 100.0), (previous, 0.0)):
        original = model.sample_chunks
        model.sample_chunks = lambda h, n, s=samples: s.unsqueeze(0).expand(n, *s.shape)
        try:
            acc = BrierAccumulator()
            acc.update(calm_block_terms(model, blocks))
            report = acc.result()
        finally:
            model.sample_chunks = original
        assert report["brierlm"] == pytest.approx(expected, abs=15.0 if expected == 0 else 1e-9)


def test_calm_brierlm_is_computed_on_real_blocks(trained_pair):
    _, model, val, *_ = trained_pair
    tally = score_blocks(model, "calm", val[:4], seed=0, device=torch.device("cpu"))
    report, positions = metrics_from("calm", tally, blocks=4, block_tokens=val.shape[1])
    assert positions == 4 * (val.shape[1] // 4 - 1)
    assert -1.0 <= report["brier1"] <= 1.0 and 0.0 <= report["brierlm"] <= 100.0
    # The same seed gives the same figures: each block's draws come from (seed, block index) only.
    again, _ = metrics_from("calm", score_blocks(model, "calm", val[:4], seed=0, device=torch.device("cpu")), 4,
                            val.shape[1])
    assert again == report


def teacher_forced(model, blocks):
    """The teacher-forced next-token distributions of blocks, and their recorded context."""
    context = SharedContext(model.backbone)
    with context.recording():
        probs = torch.softmax(model.logits(blocks[:, :-1]).float(), dim=-1)
    return probs, context


def one_block(next_token_probs):
    """A multi-block rollout callable on block 0 only: (starts, continuation) -> probabilities."""
    return lambda starts, continuation: next_token_probs(torch.zeros_like(starts), starts, continuation)


@pytest.mark.parametrize("backend,groups", [("sdpa", 0), ("sdpa", 2), ("local", 0)])
def test_baseline_rollouts_tree_and_recomputed_agree_with_teacher_forcing(backend, groups):
    """Both rollout paths give the distribution after start's context plus its continuation, as the
    teacher-forced forward of the whole path does; the tree forward in one group or several."""
    cfg = tiny_cfg(**{"attention_backend": backend, "num_attention_heads": 4, "num_query_groups": groups})
    torch.manual_seed(0)
    model = TokenBaseline(cfg.model).eval()
    tokens = torch.randint(0, 96, (20,))
    with torch.no_grad():
        teacher, context = teacher_forced(model, tokens[None])
        teacher = teacher[0]
        assert context.length == 19 and context.blocks == 1
        starts = torch.tensor([0, 4, 11, 14, 7])
        for width in (1, 2, 3):  # continuation = the true next tokens: the path is tokens[: start + 1 + width]
            continuation = tokens[starts[:, None] + 1 + torch.arange(width)]
            expected = teacher[starts + width]
            grouped = one_block(tree_next_token_probs(model, tokens[None], context, rows_per_forward=2))(starts, continuation)
            whole = one_block(tree_next_token_probs(model, tokens[None], context))(starts, continuation)
            recomputed = one_block(recomputed_next_token_probs(model, tokens[None]))(starts, continuation)
            for probs in (grouped, whole, recomputed):
                assert torch.allclose(probs, expected, atol=1e-5), (width, (probs - expected).abs().max())
        # A continuation off the true path (sampled tokens) agrees between the two paths too.
        off_path = torch.randint(0, 96, (5, 3))
        assert torch.allclose(one_block(tree_next_token_probs(model, tokens[None], context))(starts, off_path),
                              one_block(recomputed_next_token_probs(model, tokens[None]))(starts, off_path), atol=1e-5)
    assert baseline_next_token_probs(model, tokens[None], context).__qualname__.startswith("tree_next_token_probs")
    assert baseline_next_token_probs(model, tokens[None], None).__qualname__.startswith("recomputed_next_token_probs")


@pytest.mark.parametrize("backend", ["sdpa", "local"])
def test_tree_rollouts_over_several_blocks_see_only_their_own_block(backend):
    """Three blocks recorded in one forward: rows of every block mixed in one rollout forward each
    get what the teacher-forced forward of their own path gives, so no row sees another block."""
    cfg = tiny_cfg(**{"attention_backend": backend})
    torch.manual_seed(0)
    model = TokenBaseline(cfg.model).eval()
    blocks = torch.randint(0, 96, (3, 20))
    with torch.no_grad():
        teacher, context = teacher_forced(model, blocks)
        assert (context.blocks, context.steps_per_block, context.length) == (3, 19, 57)
        rows = torch.tensor([2, 0, 1, 0, 2, 1])
        starts = torch.tensor([3, 9, 0, 14, 12, 5])
        for width in (1, 3):
            continuation = blocks[rows[:, None], starts[:, None] + 1 + torch.arange(width)]
            expected = teacher[rows, starts + width]
            for rollout in (tree_next_token_probs(model, blocks, context, rows_per_forward=4),
                            recomputed_next_token_probs(model, blocks)):
                probs = rollout(rows, starts, continuation)
                assert torch.allclose(probs, expected, atol=1e-5), (width, (probs - expected).abs().max())


def test_a_rollout_forward_attends_only_to_the_blocks_its_rows_continue():
    """Rows come block after block (as baseline_brier_terms_blocks asks for them): each rollout
    forward gets the recorded keys of the blocks its rows continue, not every block's, which at
    long contexts would be most of its attention; the probabilities stay those of each row's path."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = TokenBaseline(cfg.model).eval()
    blocks = torch.randint(0, 96, (4, 20))
    rows = torch.tensor([0, 0, 1, 1, 1, 3, 3])
    starts = torch.tensor([3, 9, 0, 14, 12, 5, 16])
    width = 2
    continuation = blocks[rows[:, None], starts[:, None] + 1 + torch.arange(width)]
    keys_seen = []
    core = model.backbone.decoder.layers[0].self_attention.core_attention
    handle = core.register_forward_hook(lambda module, args, out: keys_seen.append(args[1].shape[0]))
    with torch.no_grad():
        teacher, context = teacher_forced(model, blocks)
        keys_seen.clear()
        probs = tree_next_token_probs(model, blocks, context, rows_per_forward=3)(rows, starts, continuation)
    handle.remove()
    steps = context.steps_per_block
    # groups of three rows: blocks {0, 1} -> 0..1; {1, 3} -> 1..3; {3} -> 3 alone; then their own steps
    assert keys_seen == [2 * steps + 3 * width, 3 * steps + 3 * width, steps + width]
    assert torch.allclose(probs, teacher[rows, starts + width], atol=1e-5)
    with pytest.raises(ValueError, match="not within the 4 recorded"):
        context.blocks_span(2, 5)


def test_baseline_brier_terms_are_the_same_from_both_rollout_paths():
    """Same seeds, same draws, same terms: the tree forward changes the cost, not the estimator."""
    cfg = tiny_cfg()
    torch.manual_seed(1)
    model = TokenBaseline(cfg.model).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaked distributions: the two draws often agree, rollouts go deep
    calls = []

    def counted_tree(model, blocks, context):
        inner = tree_next_token_probs(model, blocks, context)

        def next_token_probs(rows, starts, continuation):
            calls.append(tuple(continuation.shape))
            return inner(rows, starts, continuation)

        return next_token_probs

    for seed in range(3):
        block = torch.randint(0, 96, (33,))
        by_tree = score_baseline_block(model, block, seed, rollout=counted_tree)
        by_recompute = score_baseline_block(model, block, seed, rollout=recomputed_next_token_probs)
        for family in ("all", "aligned"):
            assert torch.allclose(by_tree.brier[family], by_recompute.brier[family], atol=1e-6)
    assert max(rows for rows, width in calls if width == 3) >= 5, calls  # rows continued three times


def test_blocks_scored_together_get_the_figures_each_gets_alone():
    """score_baseline_blocks: one teacher-forced forward and one rollout forward per step for all the
    blocks, each block drawing from its own seed: every block's loss and terms equal its own
    score, and the rollouts of the blocks were batched (one call per step, not one per block)."""
    cfg = tiny_cfg()
    torch.manual_seed(1)
    model = TokenBaseline(cfg.model).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    blocks = torch.randint(0, 96, (5, 33), generator=torch.Generator().manual_seed(2))
    seeds = [11, 3, 7, 4, 20]
    calls = []

    def counted(model, blocks, context):
        inner = tree_next_token_probs(model, blocks, context)

        def next_token_probs(rows, starts, continuation):
            calls.append(sorted(set(rows.tolist())))
            return inner(rows, starts, continuation)

        return next_token_probs

    together = score_baseline_blocks(model, blocks, seeds, rollout=counted)
    assert len(calls) <= 3 and len(calls[0]) > 1, calls  # one call per step, several blocks in it
    for block, seed, got in zip(blocks, seeds, together):
        alone = score_baseline_block(model, block, seed)
        assert got.loss == pytest.approx(alone.loss, rel=1e-5) and got.loss_weight == alone.loss_weight
        for family in ("all", "aligned"):
            assert torch.allclose(got.brier[family], alone.brier[family], atol=1e-6), family


def test_rollout_tree_layout():
    """Two rows from starts 1 and 3 of a 4-step context, two tokens each: positions, who sees whom."""
    positions, allowed = rollout_tree(torch.tensor([1, 3]), torch.tensor([[7, 8], [9, 5]]), context=4)
    assert positions.tolist() == [2, 3, 4, 5]
    rows = ["".join("x" if a else "." for a in row) for row in allowed.tolist()]
    assert rows == ["xx..x...", "xx..xx..", "xxxx..x.", "xxxx..xx"]
    # Two blocks of 3 steps end to end: a row of the second block sees only its own block's steps.
    positions, allowed = rollout_tree(torch.tensor([1, 0]), torch.tensor([[7], [9]]), context=6,
                                      offsets_A=torch.tensor([3, 0]))
    assert positions.tolist() == [2, 1]
    rows = ["".join("x" if a else "." for a in row) for row in allowed.tolist()]
    assert rows == ["...xx.x.", "x......x"]


def test_a_shared_context_refuses_what_it_cannot_hold():
    cfg = tiny_cfg()
    model = TokenBaseline(cfg.model).eval()
    context = SharedContext(model.backbone)
    with pytest.raises(RuntimeError, match="nothing recorded"):
        context.attending()


def test_baseline_rollout_on_real_blocks():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = TokenBaseline(cfg.model).eval()
    tokens = torch.randint(0, 96, (20,))
    report, positions = metrics_from("baseline", score_blocks(model, "baseline", tokens[None], seed=0,
                                                          device=torch.device("cpu")), 1, 20)
    assert positions == 20 - 4 and report["aligned"]["positions"] == 4
