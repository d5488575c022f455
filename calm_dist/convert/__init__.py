"""ZeRO checkpoints -> portable Hugging Face-style directories, and tools to look inside them.

    from calm_dist.convert import convert_checkpoint, load_converted, inspect_checkpoint, diff_checkpoints
    out = convert_checkpoint("runs/quickstart/calm", "exports/calm")   # verified against the checkpoint
    pre = load_converted(out)                                           # a calm_dist.pretrained.Pretrained

Modules, one job each: `source` (find, check and consolidate a checkpoint), `hf_config`
(config.json), `export` (write a directory atomically), `converted` (load one), `verify` (output
parity), `summary` (inspect and diff), `cli` (the `calm-convert` command).
"""

from calm_dist.convert.cli import main  # noqa: F401
from calm_dist.pretrained.converted import load_converted  # noqa: F401
from calm_dist.convert.export import convert_checkpoint  # noqa: F401
from calm_dist.checkpoint.reading import CheckpointRef, ConversionError, resolve_checkpoint  # noqa: F401
from calm_dist.convert.summary import diff_checkpoints, inspect_checkpoint  # noqa: F401
from calm_dist.convert.verify import VerificationError  # noqa: F401
