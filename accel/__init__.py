"""accel: post-training sparsity and quantization for HuggingFace transformers.

    import accel
    model, tok = accel.models.load("smollm2-135m")
    accel.patch(model, "artifact_dir")      # or `with accel.patched(...)`
    print(accel.report(model))
    accel.unpatch(model)

Importing accel changes no transformers class; it registers the quantization method "accel"
(transformers' registry for third-party methods), so `from_pretrained` loads checkpoints written
by `accel.save_pretrained`. `accel.install_model_methods()` adds
`model.patch(...)` / `model.unpatch()` to every PreTrainedModel, for those who want them.
"""
import logging as _logging

from ._version import __version__  # noqa: F401

from . import calibrate, configs, models  # noqa: F401  (calibrate: the callable package, lazy)
from .artifact import Artifact, ArtifactError
from .configs import ConfigError, IdentityConfig, MethodConfig
from .errors import AccelError
from .recipe import Recipe  # noqa: F401
from .compile import compile  # noqa: F401,A004  (light: torch.compile runs only when called)

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
from .hf_checkpoint import save_pretrained  # noqa: E402
# Registers quant_method "accel" with transformers (from_pretrained of accel checkpoints); no method code.
from .patches import hf_quantizer as _hf_quantizer  # noqa: E402,F401

__all__ = [
    "AccelError", "Artifact", "ArtifactError", "calibrate", "ConfigError", "IdentityConfig", "MethodConfig", "PatchConflictError", "Recipe", "Report",
    "TargetError", "UnsupportedModelError", "install_model_methods", "is_patched", "models", "patch", "patched", "report", "save_pretrained", "unpatch",
]
