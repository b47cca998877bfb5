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
whose measured default differs says so once, in its manifest row (accel/methods.py,
`calibration=`; `METHOD_DEFAULTS` below reads them), and nowhere else.

The manifest names each method's calibrator module; `get_calibrator` imports it on first use,
so `import accel` stays light.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from accel import methods as _methods
from accel.errors import AccelError

log = logging.getLogger(__name__)


class _MethodDefaults(Mapping):
    """Per-method departures from CalibrationSpec's defaults, read live from the manifest
    (accel/methods.py: each row's `calibration`, with why each differs); only methods that have one."""

    def _rows(self) -> dict[str, dict]:
        return {m: dict(r.calibration) for m, r in _methods.methods().items() if r.calibration}

    def __getitem__(self, method: str) -> dict:
        return self._rows()[method]

    def __iter__(self):
        return iter(self._rows())

    def __len__(self) -> int:
        return len(self._rows())

    def __repr__(self) -> str:
        return repr(self._rows())


METHOD_DEFAULTS: Mapping[str, dict] = _MethodDefaults()


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


def get_calibrator(method: str) -> Calibrator:
    """The method's Calibrator, importing its calibrator module from the manifest on first use."""
    if method not in _REGISTRY and _methods.load(method, "calibrator") and method not in _REGISTRY:
        raise _methods.not_registered(method, "calibrator", "calibrator (@register_calibrator)")
    if method not in _REGISTRY:
        known = sorted(set(_REGISTRY) | {m for m, r in _methods.methods().items() if r.calibrator})
        raise UnknownMethodError(f"no calibrator is registered for method {method!r}; registered: "
                                 f"{', '.join(known)}")
    return _REGISTRY[method]


def calibrators() -> dict[str, Calibrator]:
    """Every registered method -> its Calibrator (the manifest's calibrator modules are imported)."""
    _methods.load_all("calibrator")
    return dict(_REGISTRY)


def default_spec(method: str | None = None, **overrides):
    """The CalibrationSpec a method uses when the caller does not say: CalibrationSpec's
    defaults, then the method's manifest row (`calibration`), then `overrides` whose value is
    not None."""
    from accel.data import CalibrationSpec

    spec = dataclasses.replace(CalibrationSpec(), **_methods.calibration_defaults(method))
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
