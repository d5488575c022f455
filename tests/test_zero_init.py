"""ZeRO-3's partitioned construction (parallel.zero_init, the default): every module's parameters
are split across the ranks as soon as the module is built, so no rank holds the whole model.

The weights must equal an unpartitioned build's bit for bit (every kind, and training.init_weights
loaded one module at a time), and so must training: a run built partitioned gives the same losses
as one built whole.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from calm_dist.config import load_config, validate
from calm_dist.engines.construction_memory import built_param_count, whole_model_refusal
from calm_dist.models.autoencoder import Autoencoder
from calm_dist.models.autoencoder_io import save_autoencoder
from calm_dist.models.baseline import TokenBaseline
from calm_dist.parallel.state import ensure_model_parallel
from calm_dist.training.golden import run_losses
from tests.dist_utils import run_worker
from tests.train_utils import TINY, prepared_corpus_overrides, train

SHAPE = ["model.hidden_size=64", "model.intermediate_size=172", "model.num_layers=2", "model.num_attention_heads=4",
         "model.vocab_size=97", "model.pad_token_id=96", "model.bos_token_id=0", "model.eos_token_id=0",
         "data.seq_length=64", "autoencoder.hidden_size=64", "autoencoder.intermediate_size=160"]


def random_autoencoder(out, overrides: list[str]):
    cfg = validate(load_config(["tiny_autoencoder"], overrides))
    torch.manual_seed(3)
    return save_autoencoder(Autoencoder(cfg.autoencoder).state_dict(), cfg.autoencoder, out)


def test_every_kind_built_partitioned_equals_the_whole_build_bit_for_bit(tmp_path):
    ensure_model_parallel()  # (this process builds the baseline whose weights it saves)
    ae = random_autoencoder(tmp_path / "ae", SHAPE)
    baseline_cfg = validate(load_config(["tiny_baseline"], SHAPE))
    torch.manual_seed(11)  # weights unlike any initialisation, to load with training.init_weights
    save_file({k: v.contiguous() for k, v in TokenBaseline(baseline_cfg.model).state_dict().items()
               if isinstance(v, torch.Tensor)},
              str(tmp_path / "start.safetensors"))
    cases = ["tiny_baseline", "tiny_autoencoder", f"tiny_calm training.autoencoder_path={ae}",
             f"tiny_baseline training.init_weights={tmp_path / 'start.safetensors'}"]
    args = ["--out", str(tmp_path)]
    for case in cases:
        args += ["--case", " ".join([case, *SHAPE])]
    run_worker("zero_init_worker", *args, timeout=300, tmp_path=tmp_path)
    results = json.loads((tmp_path / "result.json").read_text())
    assert results.pop("device_count") == 2  # the node's ranks, as DeepSpeed's CPU accelerator sees them
    for case, result in results.items():
        assert result["compared"] == result["expected"] > 10, case
        assert result["differ"] == [], case
        assert result["not_sharded"] == [], case
        assert result["linear_kept"], case  # memory_efficient_linear off: F.linear stays torch's


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus_overrides(tmp_path_factory.mktemp("data"))


def test_calm_trained_from_a_partitioned_build_gives_the_losses_of_a_whole_build(data, tmp_path):
    """Three steps on 2 ranks: the weights, the optimizer's groups (decay by the parameters' real
    shapes, not their flat shards) and so every update must agree."""
    shape = [o for o in TINY if o.startswith(("model.", "autoencoder."))]
    ae = random_autoencoder(tmp_path / "ae", [*data, *shape])
    losses = {}
    for zero_init in ("true", "false"):
        out = tmp_path / f"zero_init_{zero_init}"
        train(data, "tiny_calm", out, "training.train_steps=3", "training.eval_interval=1000",
              f"training.autoencoder_path={ae}", f"parallel.zero_init={zero_init}", nproc=2)
        losses[zero_init] = run_losses(out)
    assert sorted(losses["true"]) == [1, 2, 3]
    assert losses["true"] == losses["false"]


def test_a_model_whose_whole_copies_do_not_fit_the_node_is_refused_naming_the_fix():
    """CALM-XL built whole by 8 ranks of a node with 48 GiB free (57 GiB needed): refused before
    anything is built; one rank, or the tiny model, fits."""
    gib = 1 << 30
    xl = validate(load_config(["calm_xl"], ["training.autoencoder_path=ae"]), world_size=8)
    count = built_param_count(xl)
    assert count > 1_500_000_000
    refusal = whole_model_refusal(count, local_ranks=8, available_bytes=48 * gib)
    assert refusal is not None and "parallel.zero_init=true" in refusal and "8 rank(s)" in refusal
    assert whole_model_refusal(count, local_ranks=1, available_bytes=48 * gib) is None
    tiny = validate(load_config(["tiny_baseline"], SHAPE))
    assert whole_model_refusal(built_param_count(tiny), local_ranks=8, available_bytes=gib) is None
