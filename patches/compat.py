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


__all__ = [
    "AttentionInterface", "AttentionMaskInterface", "CACHE_KWARG", "CACHE_KWARG_NAMES", "Cache", "CacheLayerMixin", "DynamicCache", "DynamicLayer",
    "PreTrainedModel", "SUPPORTED_MODEL_TYPES", "TRANSFORMERS_VERSION", "attn_implementation",
    "cache_from_kwargs", "cache_kwargs", "can_set_attn_implementation", "decoder_layers", "sdpa_attention_forward", "sdpa_mask",
    "output_cache", "set_attn_implementation", "text_config",
]
