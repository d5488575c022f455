"""Training: the DeepSpeed trainer loop and the pieces it calls (checkpoints, RNG state, stop signals)."""
