"""The only package that touches transformers: registries, cache layers and module swaps."""
from . import identity as _identity  # noqa: F401  (registers the identity method)
from . import methods as _methods  # noqa: F401  (registers every built-in method's runtime)
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
    """Add `model.patch(...)` / `model.unpatch()` to every PreTrainedModel."""
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
