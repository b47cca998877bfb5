"""accel: post-training sparsity and quantization for HuggingFace transformers.

    import accel
    model, tok = accel.models.load("smollm2-135m")
    accel.patch(model, "artifact_dir")      # or `with accel.patched(...)`
    print(accel.report(model))
    accel.unpatch(model)

Importing accel changes nothing in transformers. `accel.install_model_methods()` adds
`model.patch(...)` / `model.unpatch()` to every PreTrainedModel, for those who want them.
"""
import logging as _logging

from ._version import __version__  # noqa: F401

from . import calibrate, configs, models  # noqa: F401  (calibrate: the callable package, lazy)
from .artifact import Artifact, ArtifactError
from .configs import ConfigError, IdentityConfig, MethodConfig
from .errors import AccelError

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

from .patches import (  # noqa: E402
    PatchConflictError,
    Report,
    TargetError,
    UnsupportedModelError,
    install_model_methods,
    is_patched,
    patch,
    patched,
    report,
    unpatch,
)

__all__ = [
    "AccelError", "Artifact", "ArtifactError", "calibrate", "ConfigError", "IdentityConfig", "MethodConfig", "PatchConflictError", "Report",
    "TargetError", "UnsupportedModelError", "install_model_methods", "is_patched", "models", "patch", "patched", "report", "unpatch",
]
