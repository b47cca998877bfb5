"""The runtime (`accel.patches`): the patch engine and its undo log (core.py), each method's applier,
the attention handlers, cache layers and module swaps they install, and `accel.report`.

Inside accel.patches, transformers is reached only through compat.py (every version check lives
there). Other parts of accel use transformers too: models.py loads models, calibrate/ and eval/
run them. Importing this package changes nothing in transformers: `install_model_methods()` is
the explicit opt-in for `model.patch(...)`.
"""
from . import identity as _identity  # noqa: F401  (registers the identity method)
# Each method's runtime module is imported by accel.patch on first use (the manifest,
# accel/methods.py, names it), so importing accel loads no method's kernels.
from .core import (
    PatchConflictError,
    PatchContext,
    TargetError,
    UnsupportedModelError,
    is_patched,
    patch,
    patched,
    register_method,
    unpatch,
)
from .report import Report, report


def install_model_methods() -> None:
    """Add `model.patch(...)` / `model.unpatch()` to every PreTrainedModel (idempotent).

    Opt-in (`accel.install_model_methods()`), not done on import: adding methods to a class of
    another library is a side effect a program should ask for, not get by importing accel."""
    from .compat import PreTrainedModel

    if getattr(PreTrainedModel, "_accel_methods", False):
        return

    def _patch(self, spec=None, **kwargs):
        return patch(self, spec, **kwargs)

    def _unpatch(self):
        return unpatch(self)

    PreTrainedModel.patch = _patch
    PreTrainedModel.unpatch = _unpatch
    PreTrainedModel._accel_methods = True


__all__ = ["PatchConflictError", "PatchContext", "Report", "TargetError", "UnsupportedModelError", "install_model_methods", "is_patched",
           "patch", "patched", "register_method", "report", "unpatch"]
