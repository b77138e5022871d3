"""One typed configuration for every stage, with presets as data.

``schema`` holds the dataclasses (each field's help text and rule in its metadata), ``presets``
the presets, ``loading`` the defaults < preset < file < ``--set`` chain with type coercion,
``validation`` the one check of every rule, ``reference`` the generated table of docs/configuration.md.
"""

from raysd.config.loading import (all_keys, apply_overrides, config_from_dict, flatten, load_config,
                                  parse_set_flags, save_config)
from raysd.config.presets import PRESETS
from raysd.config.schema import (REGISTERED_DATASETS, CasConfig, Config, DatasetConfig, ModelConfig, ResourcesConfig,
                                 SamplingConfig, ScaleConfig, SearchConfig, TrainStepConfig, FinetuneConfig,
                                 fingerprint)
from raysd.config.validation import check_value, validate

__all__ = ["PRESETS", "REGISTERED_DATASETS", "CasConfig", "Config", "DatasetConfig", "ModelConfig", "ResourcesConfig",
           "SamplingConfig", "ScaleConfig", "SearchConfig", "TrainStepConfig", "FinetuneConfig", "all_keys", "apply_overrides",
           "check_value", "config_from_dict", "fingerprint", "flatten", "load_config", "parse_set_flags",
           "save_config", "validate"]
