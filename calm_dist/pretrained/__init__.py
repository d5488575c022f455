"""Load a trained model for evaluation or generation in one call (`load_pretrained`): a training
run, one of its checkpoints, or a converted directory."""

from calm_dist.pretrained.build import Pretrained, build_for_stage  # noqa: F401
from calm_dist.pretrained.loader import load_from_checkpoint, load_pretrained  # noqa: F401
