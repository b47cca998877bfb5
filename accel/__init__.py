"""accel: post-training sparsity and quantization for HuggingFace transformers.

    import accel
    model, tok = accel.models.load("smollm2-135m")
    accel.patch(model, "artifact_dir")      # or model.patch(...), or `with accel.patched(...)`
    print(accel.report(model))
    accel.unpatch(model)
"""
__version__ = "0.1.0"

import logging as _logging

from . import configs, models  # noqa: F401
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

install_model_methods()

__all__ = [
    "AccelError", "Artifact", "ArtifactError", "ConfigError", "IdentityConfig", "MethodConfig", "PatchConflictError", "Report",
    "TargetError", "UnsupportedModelError", "is_patched", "models", "patch", "patched", "report", "unpatch",
]
