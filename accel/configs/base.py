from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import methods as _methods
from ..errors import AccelError


class ConfigError(ValueError, AccelError):
    """A method config is invalid, unknown, or from an incompatible version."""


class _Mismatch(Exception):
    """`value` does not fit a type; args[0] says what was expected."""


def _describe(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a dict"
    return {bool: "true/false", int: "an int", float: "a number", str: "a string", dict: "a dict",
            list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def conform(value: Any, tp: Any) -> Any:
    """`value` checked against the annotation `tp` (bool, int, float, str, None, unions of them,
    list/tuple of one of them, dict); returns it (tuples become lists). Raises _Mismatch.
    NaN and infinity pass here (validate() names the range they miss; check_finite catches the rest)."""
    if tp is Any or tp is None:
        return value
    if tp is type(None):
        if value is None:
            return value
        raise _Mismatch(_describe(tp))
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return conform(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch(_describe(tp))
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_describe(tp))
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [conform(v, args[0]) for v in value] if args else list(value)
        return items if (origin or tp) is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch(_describe(tp))
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        # numbers.Integral admits numpy ints; bool is an int to Python but never a count here.
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:  # an annotation this checker does not know: leave it to validate()
        return value
    raise _Mismatch(_describe(tp))


_HINTS: dict[type, dict[str, Any]] = {}


def _field_types(cls) -> dict[str, Any]:
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
    return _HINTS[cls]


_REGISTRY: dict[str, type["MethodConfig"]] = {}


def register_config(cls: type["MethodConfig"]) -> type["MethodConfig"]:
    if not getattr(cls, "method", None):
        raise TypeError(f"{cls.__name__} must set a class attribute `method`")
    _REGISTRY[cls.method] = cls
    return cls


def registered_methods() -> list[str]:
    """Every method with a config: the manifest's (accel/methods.py; their config modules are
    imported here) and any registered directly."""
    _methods.load_all("config")
    return sorted(_REGISTRY)


def get_config_class(method: str) -> type["MethodConfig"]:
    # A method in the manifest (accel/methods.py) is looked up by importing its config module on
    # first use, so `import accel` imports no method's config.
    cls = _REGISTRY.get(method)
    try:
        if cls is None and _methods.load(method, "config"):
            cls = _REGISTRY.get(method)
            if cls is None:
                raise _methods.not_registered(method, "config", "config class (@register_config, method = ...)")
    except _methods.MethodError as e:  # a config error to its callers (an artifact names the file)
        raise ConfigError(str(e)) from e
    if cls is None:
        known = sorted(set(_REGISTRY) | set(_methods.methods()))
        raise ConfigError(f"unknown method {method!r}; known methods: {', '.join(known)}")
    return cls


@dataclass
class MethodConfig:
    """Base class. Subclasses are dataclasses that set `method` and `version`, and override
    `validate()` to raise `ConfigError` with a message naming the bad field."""

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.check_types()
        self.validate()
        self.check_finite()

    def check_types(self) -> None:
        """Check every field against its annotation (a JSON file can hold anything), so that
        validate() compares numbers with numbers; raises ConfigError naming the field."""
        for name, tp in _field_types(type(self)).items():
            value = getattr(self, name)
            try:
                setattr(self, name, conform(value, tp))
            except _Mismatch as e:
                raise ConfigError(f"{self.method}: {name} must be {e.args[0]}, got {value!r}") from None

    def check_finite(self) -> None:
        """No accel parameter means anything at NaN or infinity: refuse any the method's
        validate() let through (e.g. a learning rate), naming the field."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isfinite(v):
                raise ConfigError(f"{self.method}: {f.name} must be a finite number, got {v!r}")

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
    if not isinstance(d, dict) or not isinstance(d.get("method"), str):
        raise ConfigError(f"a method config must be a dict with a string 'method' key, got {d!r}")
    cls = get_config_class(d["method"])
    version = d.get("version")
    params = d.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{cls.method}: params must be a dict of config fields, got {params!r}")
    params = dict(params)
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
