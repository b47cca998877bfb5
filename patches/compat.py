"""Every transformers version check lives here, and nowhere else.

The rest of `accel.patches` talks to transformers only through the names exported below.
"""
from __future__ import annotations

import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
MIN_VERSION = Version("5.0")

if TRANSFORMERS_VERSION < MIN_VERSION:  # pragma: no cover - guarded by pyproject's bound
    raise ImportError(f"accel needs transformers >= {MIN_VERSION}, found {TRANSFORMERS_VERSION}")

from transformers import PreTrainedModel  # noqa: E402
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402

from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

# transformers 5.2x renamed the cache keyword (and model output field) `past_key_values` -> `cache`
# (the old keyword is accepted with a deprecation warning until 5.40). Detected by feature, not
# version, so a backport either way is handled.
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# Every name a layer or attention forward may receive the cache under.
CACHE_KWARG_NAMES = ("cache", "past_key_values", "past_key_value")


def cache_from_kwargs(kwargs: dict):
    """The Cache passed to a decoder layer / attention forward, under whichever name this
    transformers uses, or None."""
    for name in CACHE_KWARG_NAMES:
        c = kwargs.get(name)
        if c is not None:
            return c
    return None


def cache_kwargs(cache) -> dict:
    """Keyword arguments passing `cache` to a model forward: `model(ids, **cache_kwargs(c))`."""
    return {CACHE_KWARG: cache}


def output_cache(outputs):
    """The cache a model forward returned."""
    return getattr(outputs, CACHE_KWARG)


# model_type values accel has tested; each maps to the attribute path of its decoder layers.
SUPPORTED_MODEL_TYPES = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma3_text": "model.layers",
}


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attn_implementation(model) -> str:
    return model.config._attn_implementation


def set_attn_implementation(model, name: str) -> None:
    model.set_attn_implementation(name)


def can_set_attn_implementation(model) -> bool:
    return bool(model._can_set_attn_implementation())


def decoder_layers(model):
    """The decoder layers of a supported model, as an `nn.ModuleList`."""
    path = SUPPORTED_MODEL_TYPES[text_config(model.config).model_type]
    return model.get_submodule(path)


# -- the quantizer registry (accel as a transformers quantization method: patches/hf_quantizer.py) --
# Third-party methods register through `register_quantization_config` / `register_quantizer`
# (transformers >= 4.46); the loading hooks used are HfQuantizer's `preprocess_model` ->
# `_process_model_before_weight_loading(model, checkpoint_files=...)` on the meta model and
# `_process_model_after_weight_loading`; saving goes through `is_serializable` and
# `get_state_dict_and_metadata` (5.x). Checked on 5.24.
from transformers.quantizers import HfQuantizer  # noqa: E402
from transformers.quantizers import auto as _quant_auto  # noqa: E402
from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402


def register_quantization_method(name: str, config_cls, quantizer_cls) -> None:
    """Register a quantization config + quantizer under `quant_method = name` (idempotent: a
    second import of accel, or a reload, finds its own classes there and leaves them)."""
    if name not in _quant_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        _quant_auto.register_quantization_config(name)(config_cls)
    if name not in _quant_auto.AUTO_QUANTIZER_MAPPING:
        _quant_auto.register_quantizer(name)(quantizer_cls)


def quantizer_checkpoint_files(kwargs: dict, model) -> list[str] | None:
    """The checkpoint files `from_pretrained` resolved, as the before-weight-loading hook sees them
    (5.x passes `checkpoint_files`; None where a version does not)."""
    files = kwargs.get("checkpoint_files")
    return None if files is None else [str(f) for f in files]


def keys_to_ignore_on_load_unexpected(model) -> set:
    """The model's own set of unexpected checkpoint keys (regexes) not to warn about; added to in place."""
    keys = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    keys = set(keys or ())
    model._keys_to_ignore_on_load_unexpected = keys
    return keys


__all__ = [
    "HfQuantizer", "QuantizationConfigMixin", "keys_to_ignore_on_load_unexpected", "quantizer_checkpoint_files",
    "register_quantization_method",
    "AttentionInterface", "AttentionMaskInterface", "CACHE_KWARG", "CACHE_KWARG_NAMES", "Cache", "CacheLayerMixin", "DynamicCache", "DynamicLayer",
    "PreTrainedModel", "SUPPORTED_MODEL_TYPES", "TRANSFORMERS_VERSION", "attn_implementation",
    "cache_from_kwargs", "cache_kwargs", "can_set_attn_implementation", "decoder_layers", "sdpa_attention_forward", "sdpa_mask",
    "output_cache", "set_attn_implementation", "text_config",
]

# ---- compiled decode (issue 19): static cache layers and compile helpers ----------------------------
from transformers.cache_utils import StaticCache, StaticLayer  # noqa: E402

try:  # transformers >= 5.x: generation's compile settings (applies to every device with _compile_all_devices)
    from transformers.generation.configuration_utils import CompileConfig  # noqa: E402
except ImportError:  # pragma: no cover
    CompileConfig = None


def is_compiling() -> bool:
    """True while Dynamo traces (StaticLayer skips `mark_static_address` then, as we do)."""
    import torch

    return torch.compiler.is_compiling()


def mark_static_address(t) -> None:
    """Tag a cache buffer as a fixed address (transformers does this for StaticLayer's K/V)."""
    import torch

    torch._dynamo.mark_static_address(t)


def compile_config(**kwargs):
    """generate()'s CompileConfig, applied on CPU too (transformers compiles on CUDA/XPU only by default)."""
    if CompileConfig is None:  # pragma: no cover
        raise ImportError("this transformers has no generation CompileConfig")
    cfg = CompileConfig(**kwargs)
    # A private field in 5.x: transformers auto-compiles decode steps only on GPUs unless it is set.
    cfg._compile_all_devices = True
    return cfg
