from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A method config is invalid, unknown, or from an incompatible version."""


_REGISTRY: dict[str, type["MethodConfig"]] = {}


def register_config(cls: type["MethodConfig"]) -> type["MethodConfig"]:
    if not getattr(cls, "method", None):
        raise TypeError(f"{cls.__name__} must set a class attribute `method`")
    _REGISTRY[cls.method] = cls
    return cls


def registered_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def get_config_class(method: str) -> type["MethodConfig"]:
    _load_builtin_methods()
    try:
        return _REGISTRY[method]
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; known methods: {', '.join(sorted(_REGISTRY))}") from None


def _load_builtin_methods() -> None:
    # Method modules register themselves on import; importing here keeps the registry complete
    # for artifact loading without making `accel.configs` import every method eagerly.
    from . import _builtin  # noqa: F401


@dataclass
class MethodConfig:
    """Base class. Subclasses are dataclasses that set `method` and `version`, and override
    `validate()` to raise `ConfigError` with a message naming the bad field."""

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - trivial default
        pass

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "version": self.version, "params": dataclasses.asdict(self)}

    @classmethod
    def upgrade_params(cls, version: Any, params: dict[str, Any]) -> dict[str, Any]:
        """Params of an artifact written with another `version`, as this version reads them.
        Default: no older version is readable (ConfigError); subclasses that bump `version`
        override this to keep old artifacts loading."""
        raise ConfigError(
            f"{cls.method}: artifact config version {version} is not supported by this accel "
            f"(expects version {cls.version}); re-run calibration or install the matching accel"
        )

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "MethodConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ConfigError(f"{cls.method}: unknown config field(s) {unknown}; expected {sorted(names)}")
        return cls(**params)


def config_from_dict(d: dict[str, Any]) -> MethodConfig:
    if not isinstance(d, dict) or "method" not in d:
        raise ConfigError(f"a method config must be a dict with a 'method' key, got {d!r}")
    cls = get_config_class(d["method"])
    version = d.get("version")
    params = dict(d.get("params", {}))
    if version != cls.version:
        params = cls.upgrade_params(version, params)
    return cls.from_params(params)


@register_config
@dataclass
class IdentityConfig(MethodConfig):
    """Routes attention and linears through accel's patch machinery without changing any math.

    Used to check that patching itself is exact, and as the cheapest smoke test of an install.
    """

    method: ClassVar[str] = "identity"
    version: ClassVar[int] = 1
    attention: bool = True
    linears: bool = True
