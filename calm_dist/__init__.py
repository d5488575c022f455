"""calm-dist: distributed pretraining for Continuous Autoregressive Language Models (CALM)."""

from calm_dist.compat.megatron_import import defer_megatron_compile

__version__ = "0.1.0"

# Before anything imports megatron-core: its torch.compile decorators would otherwise load torch's
# compiler stack (2-3 s of CPU) in every process (calm_dist/compat/megatron_import.py).
defer_megatron_compile()
