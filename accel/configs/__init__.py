"""One small dataclass config per method, each with a version and validation.

Methods register their config class with `@register_config`, in the config module the manifest
(accel/methods.py) names; the registry imports it on first lookup. Artifacts store
`{"method", "version", "params"}` and rebuild the class through the registry, so a JSON file
never names arbitrary code to run.
"""
from .base import (
    ConfigError,
    IdentityConfig,
    MethodConfig,
    config_from_dict,
    get_config_class,
    register_config,
    registered_methods,
)

__all__ = [
    "ConfigError", "IdentityConfig", "MethodConfig", "config_from_dict", "get_config_class",
    "register_config", "registered_methods",
]
