"""One small dataclass config per method, each with a version and validation.

Methods register their config class with `@register_config`; artifacts store
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

# After base: each method's config module imports base and registers itself. Importing them
# here (not lazily from base.py) keeps base -> method configs -> base from being a cycle.
from . import _builtin  # noqa: E402,F401

__all__ = [
    "ConfigError", "IdentityConfig", "MethodConfig", "config_from_dict", "get_config_class",
    "register_config", "registered_methods",
]
