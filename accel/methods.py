"""The manifest of methods: the one table that says which modules make up each method.

Every registry loads a method's modules from here, on first use (so `import accel` imports none
of them): the config registry (`accel.configs.get_config_class`) its `config` module, the patch
engine (`accel.patch`) its `runtime` module, `accel.calibrate` its `calibrator` module, and the
command line (`accel/cli.py`) its `cli` modules. A method with no `cli` module gets a generic
`accel calibrate <method>` whose options are its config's fields (calibrate/generic_cli.py).

Each module registers what it defines, by name, when it is imported: the config class with
`@register_config`, the applier with `@register_method("name", claims=...)`, the calibrator with
`@register_calibrator("name")`; a cli module defines `register(cli)`. A new method outside
accel adds its row with `add_method` (docs/adding_a_method.md):

    accel.methods.add_method("keep-last", config="mypkg.config", runtime="mypkg.runtime",
                             calibrator="mypkg.calibrate")

This module imports nothing of accel but its errors, so that every registry may import it.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .errors import AccelError

PARTS = ("config", "runtime", "calibrator")
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_CALIBRATION_KEYS = ("source", "n_samples", "seq_len", "seed")


class MethodError(ValueError, AccelError):
    """A manifest row is malformed, or one of its modules cannot be imported or registers nothing."""


@dataclass(frozen=True)
class MethodModules:
    """One method's row: the modules that make it up (dotted import paths).

    config:      defines the `@register_config` MethodConfig subclass whose `method` is the row's name.
    runtime:     registers the applier with `@register_method(name, claims=...)` (accel.patches.core).
    calibrator:  registers `@register_calibrator(name)` (accel.calibrate.registry); None: the
                 method is patched from a config alone and has no `accel calibrate` command.
    cli:         command modules, each with `register(cli)` (its `calibrate`, `eval`, `bench`
                 commands and exporters); empty: the generic `accel calibrate <name>`.
    calibration: the method's measured departures from accel.data.CalibrationSpec's defaults
                 (keys n_samples, seq_len, source, seed), used wherever the caller does not say.
    """

    config: str
    runtime: str
    calibrator: str | None = None
    cli: tuple[str, ...] = ()
    calibration: Mapping[str, object] = field(default_factory=dict)


# The built-in methods. Why a calibration default differs from CalibrationSpec's (128 x 512
# tokens, the Wanda/DSnoT default measured in docs/results.md: 1.4x / 2.3x one plain forward):
#   double-sparsity: 32 x 512 -- channel statistics converge fast;
#   gqsa:            16 x 256 -- BQPO cost grows with the tokens (64 x 256 is better, ~4x slower);
#   rsparse:          8 x 512 -- the R-Sparse table in docs/results.md.
BUILTIN_METHODS: Mapping[str, MethodModules] = MappingProxyType({
    "double-sparsity": MethodModules(
        config="accel.configs.double_sparsity", runtime="accel.patches.double_sparsity",
        calibrator="accel.calibrate.double_sparsity", cli=("accel.calibrate.ds_cli", "accel.eval.ds_cli"),
        calibration={"n_samples": 32}),
    "prune": MethodModules(
        config="accel.configs.prune", runtime="accel.patches.prune", calibrator="accel.calibrate.prune_artifact",
        cli=("accel.calibrate.prune_cli", "accel.eval.prune_cli")),
    "gqsa": MethodModules(
        config="accel.configs.gqsa", runtime="accel.patches.gqsa", calibrator="accel.calibrate.gqsa",
        cli=("accel.calibrate.gqsa_cli", "accel.eval.gqsa_cli"), calibration={"n_samples": 16, "seq_len": 256}),
    "rsparse": MethodModules(
        config="accel.configs.rsparse", runtime="accel.patches.rsparse", calibrator="accel.calibrate.rsparse",
        cli=("accel.calibrate.rsparse_cli", "accel.eval.rsparse_cli"), calibration={"n_samples": 8}),
})

_METHODS: dict[str, MethodModules] = dict(BUILTIN_METHODS)


def _check_module(name: str, part: str, mod, optional: bool = False) -> None:
    if mod is None and optional:
        return
    if not isinstance(mod, str) or not _MODULE.match(mod):
        raise MethodError(f"method {name!r}: {part} must be a dotted module name like 'mypkg.{part}', got {mod!r}")


def add_method(name: str, *, config: str, runtime: str, calibrator: str | None = None,
               cli: str | tuple[str, ...] | list[str] | None = None,
               calibration: Mapping[str, object] | None = None) -> MethodModules:
    """Add a method's row to the manifest (see MethodModules for the fields); returns the row.

    Nothing is imported here: each registry imports the module it needs on first use, and raises
    MethodError naming the module if it cannot be imported or does not register `name`. Adding
    the same row again is a no-op; a different row for a name that exists is refused."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise MethodError(f"add_method: name must be lower-case words joined by '-' (like 'keep-last'), "
                          f"got {name!r}")
    for part, mod in (("config", config), ("runtime", runtime)):
        _check_module(name, part, mod)
    _check_module(name, "calibrator", calibrator, optional=True)
    clis = (cli,) if isinstance(cli, str) else tuple(cli or ())
    for mod in clis:
        _check_module(name, "cli", mod)
    calibration = dict(calibration or {})
    unknown = sorted(set(calibration) - set(_CALIBRATION_KEYS))
    if unknown:
        raise MethodError(f"method {name!r}: calibration has unknown key(s) {unknown}; expected some of "
                          f"{list(_CALIBRATION_KEYS)}")
    row = MethodModules(config=config, runtime=runtime, calibrator=calibrator, cli=clis, calibration=calibration)
    old = _METHODS.get(name)
    if old is not None and old != row:
        raise MethodError(f"method {name!r} is already in the manifest ({old}); pick another name")
    _METHODS[name] = row
    return row


def methods() -> dict[str, MethodModules]:
    """Every method in the manifest -> its row (a copy)."""
    return dict(_METHODS)


def row(name: str) -> MethodModules | None:
    return _METHODS.get(name)


def load(name: str, part: str) -> bool:
    """Import method `name`'s `part` module ("config", "runtime" or "calibrator"); False when the
    manifest has no such module for it. MethodError (naming the module) when the import fails."""
    if part not in PARTS:
        raise ValueError(f"load: part must be one of {PARTS}, got {part!r}")
    r = _METHODS.get(name)
    mod = getattr(r, part, None) if r is not None else None
    if mod is None:
        return False
    try:
        importlib.import_module(mod)
    except ImportError as e:
        raise MethodError(f"method {name!r}: cannot import its {part} module {mod!r}: {e}") from e
    return True


def load_all(part: str) -> None:
    """Import every method's `part` module (for listings: `accel.calibrate.registry.calibrators()`)."""
    for name in list(_METHODS):
        load(name, part)


def not_registered(name: str, part: str, what: str) -> MethodError:
    """The error for a module that imported fine but did not register `name`."""
    return MethodError(f"method {name!r}: its {part} module {getattr(_METHODS.get(name), part, None)!r} was imported "
                       f"but registered no {what} for {name!r}")


def calibration_defaults(name: str | None) -> dict[str, object]:
    """The method's departures from CalibrationSpec's defaults (empty when it has none)."""
    r = _METHODS.get(name) if name is not None else None
    return dict(r.calibration) if r is not None else {}


__all__ = ["BUILTIN_METHODS", "MethodError", "MethodModules", "add_method", "calibration_defaults", "load",
           "load_all", "methods", "row"]
