"""What ZeRO-3 gathers at once (parallel.zero3_gather): each backbone layer as one unit (the
default), each attention block and MLP, or every linear on its own. The unit changes when
parameters are gathered and when their gradients are reduced, never the arithmetic: training must
give the same losses either way, also when the backward recomputes whole layers (a second forward
inside the backward) or only the core attention. (A unit whose gradients were reduced before they
existed, the failure a keyword-only layer input caused, fails at the first backward.)"""

from __future__ import annotations

import pytest

from calm_dist.training.golden import run_losses
from tests.test_zero_init import random_autoencoder
from tests.train_utils import TINY, prepared_corpus_overrides, train

UNIT_LOGS = {"layer": "ZeRO-3 gathers by layer: 2 backbone layers", "block": "ZeRO-3 gathers by block: 4 attention blocks and MLPs"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus_overrides(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_calm_on_two_ranks_trains_alike_gathered_by_layer_by_block_or_by_linear(data, tmp_path, recompute):
    shape = [o for o in TINY if o.startswith(("model.", "autoencoder."))]
    ae = random_autoencoder(tmp_path / "ae", [*data, *shape])
    losses, logs = {}, {}
    for gather in ("layer", "block", "linear"):
        out = tmp_path / gather
        proc = train(data, "tiny_calm", out, "training.train_steps=3", "training.eval_interval=1000",
                     f"training.autoencoder_path={ae}", f"parallel.zero3_gather={gather}",
                     f"parallel.activation_recompute={recompute}", nproc=2)
        losses[gather], logs[gather] = run_losses(out), proc.stdout + proc.stderr
    assert sorted(losses["layer"]) == [1, 2, 3]
    for gather in ("block", "linear"):
        # the units place the gathered weights elsewhere in memory: the CPU's matrix kernels may
        # round the last bit differently, nothing more
        assert losses[gather] == pytest.approx(losses["layer"], rel=1e-6), gather
    # 2 layers: 2 attention blocks and 2 MLPs
    for gather, line in UNIT_LOGS.items():
        assert line in logs[gather]
    assert "ZeRO-3 gathers by" not in logs["linear"]


def test_an_unknown_gather_unit_is_refused_naming_the_choices(data, tmp_path):
    proc = train(data, "tiny_baseline", tmp_path / "bad", "parallel.zero3_gather=module", check=False)
    assert proc.returncode != 0
    assert "parallel.zero3_gather must be one of 'layer', 'block', 'linear', got 'module'" in proc.stderr


def test_a_unit_whose_input_needs_no_gradient_is_refused_with_the_fix_named():
    """A frozen embedding would make DeepSpeed reduce the first layer's gradients before they
    exist; the unit says so at its forward instead."""
    import torch

    from calm_dist.config import load_config, validate
    from calm_dist.models.baseline import TokenBaseline
    from calm_dist.parallel.state import ensure_model_parallel
    from calm_dist.parallel.zero3 import mark_gather_units

    ensure_model_parallel()
    cfg = validate(load_config(["tiny_baseline"], ["model.num_layers=1"]))
    model = TokenBaseline(cfg.model).train()
    assert mark_gather_units(model, "layer") == 1
    tokens = torch.randint(0, cfg.model.vocab_size - 1, (2, 17))
    model(tokens).loss.backward()  # a trainable input: no complaint
    model.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="needs no gradient .*parallel.zero3_gather=linear"):
        model(tokens)
    with torch.no_grad():
        model(tokens)  # evaluation: nothing to reduce
