"""calm-dist: distributed pretraining for Continuous Autoregressive Language Models (CALM)."""

__version__ = "0.1.0"
