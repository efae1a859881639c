"""Typed configuration: dataclasses <- YAML <- `--set a.b=c` overrides."""

from cohortcast.config.loader import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    flatten,
    from_dict,
    load,
    to_dict,
)
from cohortcast.config.schema import (
    CohortcastConfig,
    IngestConfig,
    PrivacyConfig,
    RayConfig,
    SplitConfig,
    SynthConfig,
)


def load_config(path=None, overrides=None) -> CohortcastConfig:
    """Load the root config from an optional YAML file plus `a.b=c` overrides."""
    return load(CohortcastConfig, path, overrides)


__all__ = [
    "CohortcastConfig",
    "ConfigError",
    "IngestConfig",
    "PrivacyConfig",
    "RayConfig",
    "SplitConfig",
    "SynthConfig",
    "apply_overrides",
    "dump_yaml",
    "flatten",
    "from_dict",
    "load",
    "load_config",
    "to_dict",
]
