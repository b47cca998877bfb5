"""accel as a transformers quantization method: `quant_method = "accel"`.

Registered with transformers' third-party registry when accel is imported (cheap: this module
imports no method's code), so that after `import accel`

    AutoModelForCausalLM.from_pretrained(dir)       # or pipeline("text-generation", model=dir)

builds the patched model of a checkpoint `accel.save_pretrained` wrote. Without accel,
transformers names the unknown quantization method "accel" and then fails on the empty `weight`
each patched module has at its standard key (accel/hf_checkpoint.py HIDDEN): no accel
checkpoint loads as a model without its method.

The work is in accel/hf_checkpoint.py (saving) and accel/hf_checkpoint_load.py (loading); this
module is the glue transformers calls.
"""
from __future__ import annotations

import logging
import types
from typing import Any

from accel.hf_checkpoint import FORMAT_VERSION, QUANT_METHOD, SUPPORTED_FORMAT_VERSIONS

from . import compat, core
from .undo import _MISSING, DictEntry

log = logging.getLogger(__name__)


class AccelQuantizationConfig(compat.QuantizationConfigMixin):
    """config.json's `quantization_config`: format_version, the method configs in patch order (each
    `MethodConfig.to_dict()`), the base model's fingerprint and the accel version that wrote it."""

    def __init__(self, methods: list | None = None, format_version: int = FORMAT_VERSION,
                 fingerprint: dict | None = None, accel_version: str | None = None, quant_method: str = QUANT_METHOD,
                 **extra: Any):
        from accel.artifact import ArtifactError

        self.quant_method = QUANT_METHOD
        if format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise ArtifactError(f"accel checkpoint format version {format_version!r} is not supported: this accel "
                                f"reads version(s) {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))} (upgrade accel, "
                                f"or re-export the checkpoint with this one)")
        if not isinstance(methods, list) or not methods or not all(isinstance(m, dict) for m in methods):
            raise ArtifactError(f"accel checkpoint: quantization_config.methods must be a non-empty list of method "
                                f"configs, got {methods!r}")
        self.format_version = format_version
        self.methods = methods
        self.fingerprint = dict(fingerprint or {})
        if accel_version is None:
            from accel._version import __version__ as accel_version
        self.accel_version = accel_version
        # Unknown keys from a newer writer are kept (and written back), not dropped.
        self.__dict__.update(extra)

    def method_configs(self) -> list:
        """The MethodConfig objects (older config versions upgraded); ArtifactError naming a bad one."""
        from accel.artifact import ArtifactError
        from accel.configs import ConfigError, config_from_dict

        out = []
        for i, d in enumerate(self.methods):
            try:
                out.append(config_from_dict(d))
            except ConfigError as e:
                raise ArtifactError(f"accel checkpoint: quantization_config.methods[{i}]: {e}") from None
        return out


class AccelHfQuantizer(compat.HfQuantizer):
    """Loads an accel checkpoint (pre-quantized only) and saves a patched model."""

    requires_calibration = True

    def __init__(self, quantization_config: AccelQuantizationConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._load = None

    def validate_environment(self, *args, **kwargs) -> None:
        return None

    def _process_model_before_weight_loading(self, model, **kwargs):
        from accel.hf_checkpoint_load import before_weight_loading

        self._load = before_weight_loading(model, self.quantization_config,
                                           compat.quantizer_checkpoint_files(kwargs, model))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from accel.hf_checkpoint_load import after_weight_loading

        load, self._load = self._load, None
        after_weight_loading(model, load)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        # Raises naming a method that has no checkpoint format: a checkpoint that would load
        # wrong is never written.
        from accel.hf_checkpoint import check_serializable

        check_serializable(self.quantization_config.method_configs())
        return True

    def get_state_dict_and_metadata(self, model):
        from accel.hf_checkpoint import checkpoint_state_dict

        return checkpoint_state_dict(model)

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        # Patching never stopped generate() from compiling; the quantizer should not either.
        return True


def quantizer_for(configs) -> AccelHfQuantizer:
    """The quantizer a patched model carries for `configs` (its methods in patch order)."""
    cfg = AccelQuantizationConfig(methods=[c.to_dict() for c in configs])
    return AccelHfQuantizer(cfg, pre_quantized=True)


def _save_pretrained(model, *args, **kwargs):
    """A patched model's `save_pretrained`: transformers' own, with accel.models.load's session
    keys kept off config.json (config.json then holds accel only as quantization_config)."""
    from accel.hf_checkpoint import session_keys_off

    with session_keys_off(model.config):
        return type(model).save_pretrained(model, *args, **kwargs)


def attach(model, state) -> None:
    """Give the patched model accel's quantizer and quantization_config, undoably, so that
    `model.save_pretrained(dir)` writes an accel checkpoint (or refuses, naming a method that
    cannot be saved) instead of tensors that load as random weights. Runs after every accel.patch."""
    old = model.__dict__.get("hf_quantizer", _MISSING)
    if old is not _MISSING and old is not None and not isinstance(old, AccelHfQuantizer):
        log.info("%s carries a %s quantizer; model.save_pretrained keeps it (accel.save_pretrained refuses)",
                 type(model).__name__, type(old).__name__)
        return
    q = quantizer_for(state.methods)
    state.undo.append(DictEntry("", "hf_quantizer", old))
    model.__dict__["hf_quantizer"] = q
    state.undo.append(core.ConfigEntry("quantization_config",
                                       model.config.__dict__.get("quantization_config", _MISSING)))
    model.config.__dict__["quantization_config"] = q.quantization_config
    # transformers writes config.json from every key of model.config after the quantizer's last
    # hook (get_state_dict_and_metadata), so the session keys are taken off around the whole call.
    # A bound method, not a closure: copy.deepcopy(model) rebinds it to the copy.
    state.undo.append(DictEntry("", "save_pretrained", model.__dict__.get("save_pretrained", _MISSING)))
    model.__dict__["save_pretrained"] = types.MethodType(_save_pretrained, model)


def register() -> None:
    if attach not in core._ON_PATCHED:
        core._ON_PATCHED.append(attach)
    compat.register_quantization_method(QUANT_METHOD, AccelQuantizationConfig, AccelHfQuantizer)


register()
