"""Typed configuration: dataclasses (`schema`), YAML layering and overrides (`loader`), and the one
validation step (`validate`)."""

from calm_dist.config.errors import ConfigError  # noqa: F401
from calm_dist.config.loader import (  # noqa: F401
    config_from_dict,
    config_to_dict,
    flatten_config,
    list_presets,
    load_config,
    save_config,
)
from calm_dist.config.schema import (  # noqa: F401
    AutoencoderConfig,
    DataConfig,
    DerivedConfig,
    JobConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
)
from calm_dist.config.validate import validate  # noqa: F401
