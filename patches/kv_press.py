"""The base of every KV-cache method ("press"): what one needs from transformers, written once.

A press is the five places of any method (docs/adding_a_method.md): a config, a kernel folder
that owns the math, an applier registered with `@register_method` that calls `install_press`, a
calibrator, and a row in the manifest (accel/methods.py). The handler subclasses
`PressHandler` and overrides what it changes:

    class KeepLastN(PressHandler):
        def with_cache(self, module, query, key, value, attention_mask, layer, **kwargs):
            # one forward with a KV cache; key/value hold every cached token (post-RoPE)
            return self.dense(module, query, key[:, :, -N:], value[:, :, -N:], None, **kwargs)

    @register_method("keep-last", claims=("attention",))
    def apply(ctx, cfg, tensors):
        install_press(ctx, lambda i, attn: KeepLastN(i), detail="keep last N")

Hooks of `PressHandler` (all optional; the defaults are dense attention, bit-identical to SDPA):
- `with_cache(module, query, key, value, attention_mask, layer, **kw)`: a forward that has a
  transformers Cache (prefill and decode). `layer` is this layer's cache layer, already
  upgraded by `upgrade_layer` (or whatever the cache holds, for cache types that are not a
  plain `DynamicLayer`: static, quantized, offloaded; or None).
- `without_cache(module, query, key, value, attention_mask, **kw)`: a scoring forward (perplexity,
  lm-eval loglikelihood): no cache, every query row at once, causal.
- `upgrade_layer(layer) -> layer`: called once per layer and cache, the first time this handler
  sees a plain `DynamicLayer` there; return a `DynamicLayer` subclass that keeps what the press
  needs next to K/V (it then follows crop, beam reorder, reset...). Default: keep it.
- `upgrade_static_layer(layer) -> layer`: the same for a plain `StaticLayer`
  (`cache_implementation="static"`, compiled decode): a `StaticLayer` subclass with preallocated
  buffers. Default: keep it.
- `kernel_path`: the string `accel.report` shows for the layer.
Return values follow transformers' attention functions: `(out [B, Tq, H, D], weights or None)`;
`self.dense(...)` is SDPA and counts the call in `self.counts["dense"]` (`self.count(key)`; eager
calls only: a counter read inside a compiled step would be a guard that recompiles every step).

Helpers: `allowed_from_mask` / `key_mask_from` turn transformers' SDPA-style mask into the keys
each query row may see; `model_dims`, `is_sliding_layer`, `layer_of`.
"""
from __future__ import annotations

import torch

from . import compat
from .core import PatchContext

# Where the pre-hook leaves the cache for the handler (transformers does not pass it on to
# attention functions); removed again by the post-hook.
CACHE_ATTR = "_accel_press_cache"


def model_dims(model) -> dict:
    """{"layers", "heads", "kv_heads", "head_dim"} of a supported model's text config."""
    tc = compat.text_config(model.config)
    H = tc.num_attention_heads
    D = getattr(tc, "head_dim", None) or tc.hidden_size // H
    return {"layers": tc.num_hidden_layers, "heads": H, "kv_heads": getattr(tc, "num_key_value_heads", None) or H,
            "head_dim": D}


def is_sliding_layer(model, i: int, attn) -> bool:
    """Whether decoder layer i uses sliding-window attention (Gemma3's local layers)."""
    types = getattr(compat.text_config(model.config), "layer_types", None)
    if types is not None and i < len(types):
        return types[i] == "sliding_attention"
    return getattr(attn, "sliding_window", None) is not None


def layer_of(cache, i: int):
    """Cache layer i of a transformers Cache, or None."""
    layers = getattr(cache, "layers", None)
    return layers[i] if layers is not None and i < len(layers) else None


def allowed_from_mask(attention_mask, B: int, Tq: int, Tk: int, device) -> torch.Tensor:
    """The keys each query row may attend, [B, Tq, Tk] bool, from a transformers SDPA-style mask
    (bool or additive float, [B, 1, Tq, Tk]) or None (plain causal, queries are the last Tq keys)."""
    if attention_mask is None:
        i = torch.arange(Tq, device=device).view(Tq, 1) + (Tk - Tq)
        return (torch.arange(Tk, device=device).view(1, Tk) <= i).expand(B, Tq, Tk)
    m = attention_mask
    if m.dtype != torch.bool:
        m = m == 0
    m = m[:, 0] if m.dim() == 4 else m
    return m[..., -Tk:].expand(B, Tq, Tk)


def key_mask_from(attention_mask, B: int, T: int, device) -> torch.Tensor | None:
    """One decode query's valid keys [B, T] bool (False = padding), or None when all are valid."""
    m = allowed_from_mask(attention_mask, B, 1, T, device)[:, 0]
    return None if bool(m.all()) else m


def stash_cache(module, args, kwargs):
    """Forward pre-hook on an attention module: keep the Cache it receives for the handler."""
    module.__dict__[CACHE_ATTR] = compat.cache_from_kwargs(kwargs)


def drop_cache(module, args, kwargs, output):
    module.__dict__.pop(CACHE_ATTR, None)


def stashed_cache(module):
    return module.__dict__.get(CACHE_ATTR)


class PressHandler:
    """The attention handler of one pressed layer (see the module docstring for the hooks)."""

    kernel_path = "dense"

    def __init__(self, layer_idx: int):
        self.layer_idx = layer_idx
        self.counts = {"dense": 0}

    # ---- hooks ---------------------------------------------------------------------------------
    def upgrade_layer(self, layer):
        return layer

    def upgrade_static_layer(self, layer):
        return layer

    def with_cache(self, module, query, key, value, attention_mask, layer, **kwargs):
        return self.dense(module, query, key, value, attention_mask, **kwargs)

    def without_cache(self, module, query, key, value, attention_mask, **kwargs):
        return self.dense(module, query, key, value, attention_mask, **kwargs)

    # ---- machinery -----------------------------------------------------------------------------
    def count(self, key: str) -> None:
        """Count a call in `self.counts[key]`, outside torch.compile only (see the module docstring)."""
        if not torch.compiler.is_compiling():
            self.counts[key] += 1

    def dense(self, module, query, key, value, attention_mask, **kwargs):
        self.count("dense")
        return compat.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def cache_layer(self, cache):
        """This layer's cache layer; a plain `DynamicLayer` is replaced by `upgrade_layer(layer)`."""
        layers = getattr(cache, "layers", None)
        layer = layer_of(cache, self.layer_idx)
        upgrade = {compat.DynamicLayer: self.upgrade_layer, compat.StaticLayer: self.upgrade_static_layer}.get(
            type(layer)) if layer is not None else None
        if upgrade is not None:
            new = upgrade(layer)
            if new is not layer:
                layers[self.layer_idx] = layer = new
        return layer

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        cache = stashed_cache(module)
        if cache is not None:
            return self.with_cache(module, query, key, value, attention_mask, self.cache_layer(cache), **kwargs)
        return self.without_cache(module, query, key, value, attention_mask, **kwargs)


def install_press(ctx: PatchContext, make_handler, *, skip=None, detail="") -> dict[int, PressHandler]:
    """Give every decoder layer's attention a handler, undoably, with the cache hooks it needs.

    make_handler(i, attn) -> PressHandler; skip(i, attn) -> a reason (str) to leave layer i dense,
    or None; detail: the report's detail for pressed layers (a str, or a function of the handler).
    Returns {layer index: handler} of the pressed layers."""
    model = ctx.model
    prefix = compat.SUPPORTED_MODEL_TYPES[compat.text_config(model.config).model_type]
    handlers = {}
    for i, layer in enumerate(compat.decoder_layers(model)):
        attn, name = layer.self_attn, f"{prefix}.{i}.self_attn"
        reason = skip(i, attn) if skip is not None else None
        if reason:
            ctx.add_row(name, "attention", detail=f"dense ({reason})")
            continue
        handler = handlers[i] = make_handler(i, attn)
        ctx.set_attention_handler(name, attn, handler, detail=detail(handler) if callable(detail) else detail)
        ctx.add_hook(attn, stash_cache, pre=True, name=name)
        ctx.add_hook(attn, drop_cache, pre=False, name=name)
    return handlers
