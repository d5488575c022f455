"""Module groups: the parts of a model that can get their own optimizer settings
(`optimizer.lr_multipliers`, `weight_decay_multipliers`, `lr_delay_steps`).

- `embeddings`: the token embedding table (`embed_tokens`, vocabulary-split under TP);
- `compressor`: CALM's input compressor (K token embeddings -> one step input);
- `backbone`: the Transformer layers and their final norm;
- `head`: CALM's energy head, or the baseline's output layer `lm_head`;
- `autoencoder`: the whole autoencoder in its own training stage. It is one group because it has
  no trunk/head split to tune: settings for it only rescale optimizer.lr / weight_decay.

No torch here: config validation checks group names with it.
"""

from __future__ import annotations

import re

MODULE_GROUPS: dict[str, tuple[str, ...]] = {  # per training.stage, in param-group order
    "calm": ("embeddings", "compressor", "backbone", "head"),
    "baseline": ("embeddings", "backbone", "head"),
    "autoencoder": ("autoencoder",),
}

# A language model's top-level submodule -> its group. These attribute names are the same in the
# zero3 regime (DeepSpeed sees the model's own names) and in the 3d regime, where a pipeline chunk
# keeps a subset of them and the vocabulary-split tables keep theirs (`embed_tokens.weight`,
# `lm_head.weight`); megatron's layer names all sit under `backbone.`.
_TOP_MODULE_GROUP = {
    "embed_tokens": "embeddings",
    "compressor": "compressor",
    "backbone": "backbone",
    "head": "head",
    "lm_head": "head",
}

# With virtual pipeline stages the 3d engine's module is a ModuleList of chunks: "<chunk>.<name>".
_CHUNK_PREFIX = re.compile(r"^\d+\.")


def module_group(param_name: str, stage: str) -> str:
    """The module group of a trainable parameter, from its name in `model.named_parameters()`.
    A name that belongs to no group is an error: every trainable parameter must be in one."""
    if stage == "autoencoder":
        return "autoencoder"
    top = _CHUNK_PREFIX.sub("", param_name).split(".", 1)[0]
    group = _TOP_MODULE_GROUP.get(top)
    if group is None or group not in MODULE_GROUPS.get(stage, ()):
        raise ValueError(
            f"parameter {param_name!r} belongs to no module group of training.stage {stage} "
            f"({', '.join(MODULE_GROUPS.get(stage, ()))}): a new trainable submodule needs an entry "
            "in calm_dist.module_groups"
        )
    return group
