"""One calibration protocol: every method registers one function with one calling shape.

    @register_calibrator("my-method")
    def calibrate_my_method(model, config, samples, *, spec, checkpoint_dir, progress) -> Artifact:
        ...

    model:          the HF model; the function leaves it unchanged (weights restored on success
                    and on error; use `preserved_weights` around anything that changes it).
    config:         the method's MethodConfig.
    samples:        [N, T] int64 token ids, drawn by `accel.calibrate` (None only when
                    `needs_data(config)` is False, e.g. plain magnitude pruning).
    spec:           the CalibrationSpec describing `samples` (recorded in the artifact; its
                    seed also seeds the method's own randomness).
    checkpoint_dir: a directory for resumable per-layer checkpoints (calibrate/checkpoint.py),
                    or None; `accel.calibrate` always passes one and removes it after success.
    progress:       show progress bars.
    returns:        an in-memory accel.Artifact (not saved).

Defaults: `accel.data.CalibrationSpec` is the one source of calibration defaults. A method
whose measured default differs says so once, in `METHOD_DEFAULTS` below, and nowhere else.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from accel.errors import AccelError

log = logging.getLogger(__name__)

# Per-method departures from CalibrationSpec's defaults (128 x 512 tokens, the Wanda/DSnoT
# default measured in the README: 1.4x / 2.3x one plain forward). Why each differs:
#   double-sparsity: 32 x 512 — channel statistics converge fast (the README's DS numbers);
#   gqsa:            16 x 256 — the README's measured GQSA default; BQPO cost grows with the
#                    tokens (64 x 256 is better but ~4x slower, see the README's GQSA section);
#   rsparse:         8 x 512 — the README's R-Sparse table.
METHOD_DEFAULTS: dict[str, dict] = {
    "double-sparsity": {"n_samples": 32},
    "gqsa": {"n_samples": 16, "seq_len": 256},
    "rsparse": {"n_samples": 8},
}

# Modules that register the built-in methods (imported on the first lookup, so that
# `import accel` stays light). A new method registers by being imported; built-ins are listed here.
BUILTIN_MODULES = ("accel.calibrate.double_sparsity", "accel.calibrate.prune_artifact",
                   "accel.calibrate.gqsa", "accel.calibrate.rsparse")


class UnknownMethodError(KeyError, AccelError):
    """No calibrator is registered for a config's method."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Calibrator:
    method: str
    fn: Callable
    needs_data: Callable[[object], bool]
    check: Callable[[object, object], None] | None = None


_REGISTRY: dict[str, Calibrator] = {}
_loaded = False


def register_calibrator(method: str, *, needs_data: Callable[[object], bool] | None = None,
                        check: Callable[[object, object], None] | None = None):
    """Decorator: register `fn` as the calibrator of configs whose `.method == method`.

    needs_data(config) -> bool: whether it needs calibration samples (default: always).
    check(model, config): raise for a config that cannot fit the model (targets, group sizes);
    `accel.calibrate` runs it before drawing any data, so bad input fails in seconds."""
    if not isinstance(method, str) or not method:
        raise ValueError(f"register_calibrator: method must be a non-empty string, got {method!r}")

    def deco(fn):
        old = _REGISTRY.get(method)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"a calibrator for {method!r} is already registered ({old.fn.__module__}."
                             f"{old.fn.__qualname__})")
        _REGISTRY[method] = Calibrator(method, fn, needs_data or (lambda cfg: True), check)
        return fn
    return deco


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for mod in BUILTIN_MODULES:
            importlib.import_module(mod)
        _loaded = True


def get_calibrator(method: str) -> Calibrator:
    _load_builtins()
    if method not in _REGISTRY:
        raise UnknownMethodError(f"no calibrator is registered for method {method!r}; registered: "
                                 f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[method]


def calibrators() -> dict[str, Calibrator]:
    """Every registered method -> its Calibrator."""
    _load_builtins()
    return dict(_REGISTRY)


def default_spec(method: str | None = None, **overrides):
    """The CalibrationSpec a method uses when the caller does not say: CalibrationSpec's
    defaults, then METHOD_DEFAULTS[method], then `overrides` whose value is not None."""
    from accel.data import CalibrationSpec

    spec = dataclasses.replace(CalibrationSpec(), **METHOD_DEFAULTS.get(method, {}))
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(spec, **given) if given else spec


@contextlib.contextmanager
def preserved_weights(modules: Iterable[tuple[str, torch.nn.Module]]):
    """Restore the weight (and bias) of each module on exit, success or error.

    The copies live on the CPU, so a GPU model pays host memory (the size of the modules'
    weights), not device memory. Used by calibrators that change the model while they work
    (pruning, GQSA), so that `accel.calibrate` leaves the model as it found it."""
    saved = []
    for name, mod in modules:
        for attr in ("weight", "bias"):
            p = getattr(mod, attr, None)
            if isinstance(p, torch.Tensor) and p.device.type != "meta":
                saved.append((p, p.detach().to("cpu", copy=True)))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v.to(p.device))
