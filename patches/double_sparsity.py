"""Double Sparsity runtime: an attention handler per full-attention layer plus a label cache.

- Decode steps (one query token, KV cache present, context >= min_context) attend to `budget`
  tokens chosen by the r calibrated channels (`ds_decode_attention`), reading the labels from
  the cache layer (`DSLabelLayer`), which each plain `DynamicLayer` is upgraded to on first use.
- Prefill (several query tokens with a cache) is dense; the cache layer labels the prompt.
- Scoring forwards (no cache: perplexity, lm-eval loglikelihood) apply the same selection
  causally to every query row when `score_mode="sparse"`, so perplexity measures the sparsity.
- The first `n_dense` layers and sliding-window layers (Gemma3) stay dense.
"""
from __future__ import annotations

import logging

import torch

from accel.artifact import ArtifactError
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.kernels.dispatch import select_path

from . import compat
from .core import PatchContext, register_method
from .ds_cache import DSLabelLayer, fake_quantize_labels
from .ds_offload import install_offload, offload_handler_class
from .ds_select import allowed_from_mask, causal_select_attention, gather_labels

log = logging.getLogger(__name__)


def decode_attention_fn():
    """`ds_decode_attention` from the kernels package, or the local torch spec when it is absent."""
    try:
        from accel.kernels.ds_attention import ds_decode_attention
        return ds_decode_attention, True
    except ImportError:
        from .ds_select import ds_decode_attention_spec
        return ds_decode_attention_spec, False


def model_dims(model) -> dict:
    tc = compat.text_config(model.config)
    H = tc.num_attention_heads
    D = getattr(tc, "head_dim", None) or tc.hidden_size // H
    return {"layers": tc.num_hidden_layers, "heads": H, "kv_heads": getattr(tc, "num_key_value_heads", None) or H,
            "head_dim": D}


def is_sliding_layer(model, i: int, attn) -> bool:
    types = getattr(compat.text_config(model.config), "layer_types", None)
    if types is not None and i < len(types):
        return types[i] == "sliding_attention"
    return getattr(attn, "sliding_window", None) is not None


class DSAttention:
    """The attention handler of one sparse layer. channels: [KVH, r] int64."""

    def __init__(self, cfg: DoubleSparsityConfig, channels: torch.Tensor, layer_idx: int, device):
        self.cfg, self.channels, self.layer_idx = cfg, channels, layer_idx
        self.decode_fn, from_kernels = decode_attention_fn()
        self.kernel_path = f"ds-{select_path(device) if from_kernels else 'torch-spec'}"
        self.counts = {"sparse_decode": 0, "dense_decode": 0, "sparse_score": 0, "dense": 0}

    def _dense(self, module, query, key, value, attention_mask, **kwargs):
        self.counts["dense"] += 1
        return compat.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def _labels(self, cache, key: torch.Tensor) -> torch.Tensor:
        """The label cache for this layer, [B, KVH, T, r], kept in step with `key`."""
        layers = getattr(cache, "layers", None)
        layer = layers[self.layer_idx] if layers is not None and self.layer_idx < len(layers) else None
        if layer is not None and type(layer) is compat.DynamicLayer:
            layer = DSLabelLayer.from_layer(layer, self.channels.to(key.device), self.cfg.label_bits)
            layers[self.layer_idx] = layer
        if isinstance(layer, DSLabelLayer) and layer.keys is key:
            if layer.label_length() != key.shape[2]:
                # Someone changed the keys behind the cache layer's back: relabel everything.
                layer.label_parts = layer._make_parts(key)
            return layer.labels(key.dtype)
        # A cache type without labels (static, quantized, offloaded): label on the fly.
        log.debug("layer %d: cache layer %s has no label cache; gathering labels from K", self.layer_idx,
                  type(layer).__name__)
        return fake_quantize_labels(gather_labels(key, self.channels.to(key.device)), self.cfg.label_bits)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, H, Tq, D = query.shape
        Tk = key.shape[2]
        cache = module.__dict__.get("_ds_cache")
        cfg = self.cfg
        if cache is not None:
            labels = self._labels(cache, key)
            if Tq != 1 or Tk < max(cfg.min_context, 1):
                return self._dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
            key_mask = allowed_from_mask(attention_mask, B, 1, Tk, query.device)[:, 0]
            out = self.decode_fn(query, key, value, labels, self.channels.to(query.device), cfg.budget_tokens(Tk),
                                 sink=cfg.sink, recent=cfg.recent, scaling=scaling, group_reduce=cfg.group_reduce,
                                 key_mask=key_mask)
            self.counts["sparse_decode"] += 1
            return out.transpose(1, 2).contiguous(), None
        budget = cfg.budget_tokens(Tk)
        if Tq > 1 and cfg.score_mode == "sparse" and budget < Tk:
            labels = fake_quantize_labels(gather_labels(key, self.channels.to(key.device)), cfg.label_bits)
            allowed = allowed_from_mask(attention_mask, B, Tq, Tk, query.device)
            out = causal_select_attention(query, key, value, labels, self.channels.to(query.device), budget,
                                          cfg.sink, cfg.recent, scaling if scaling is not None else D ** -0.5,
                                          cfg.group_reduce, allowed)
            self.counts["sparse_score"] += 1
            return out.transpose(1, 2).contiguous(), None
        return self._dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _stash_cache(module, args, kwargs):
    # The attention forward receives the cache as a keyword; the handler needs it to find the
    # label cache, and transformers does not pass it on to attention functions.
    module.__dict__["_ds_cache"] = compat.cache_from_kwargs(kwargs)


def _drop_cache(module, args, kwargs, output):
    module.__dict__.pop("_ds_cache", None)


def check_channel_order(order, key: str, L: int, KVH: int, D: int, r: int) -> torch.Tensor:
    """The artifact's channel order [layers, kv_heads, head_dim], checked before any forward uses it:
    an integer tensor of this model's shape whose first r channels per head are distinct and in
    [0, head_dim). Raises ArtifactError naming the tensor, layer and head."""
    if not isinstance(order, torch.Tensor) or order.dtype.is_floating_point or order.dtype.is_complex \
            or order.dtype == torch.bool:
        what = order.dtype if isinstance(order, torch.Tensor) else type(order).__name__
        raise ArtifactError(f"double-sparsity: {key} is {what}; channel indices must be an integer tensor")
    if tuple(order.shape) != (L, KVH, D):
        raise ArtifactError(f"double-sparsity: {key} has shape {tuple(order.shape)}, this model needs "
                            f"[layers={L}, kv_heads={KVH}, head_dim={D}]: the artifact is for another model")
    used = order[:, :, :r].to(torch.long)
    bad = (used < 0) | (used >= D)
    if bool(bad.any()):
        i, h, c = (int(v) for v in bad.nonzero()[0])
        raise ArtifactError(f"double-sparsity: {key}[layer {i}, kv head {h}] has channel index {int(used[i, h, c])} "
                            f"outside [0, {D}) (head_dim={D})")
    srt = used.sort(dim=-1).values
    dup = (srt[..., 1:] == srt[..., :-1]).any(-1)
    if bool(dup.any()):
        i, h = (int(v) for v in dup.nonzero()[0])
        raise ArtifactError(f"double-sparsity: {key}[layer {i}, kv head {h}] repeats a channel among its first "
                            f"{r} (heavy) channels: {used[i, h].tolist()}")
    return order


@register_method("double-sparsity", claims=("attention",))
def apply_double_sparsity(ctx: PatchContext, cfg: DoubleSparsityConfig, tensors: dict) -> None:
    model = ctx.model
    dims = model_dims(model)
    L, KVH, D = dims["layers"], dims["kv_heads"], dims["head_dim"]
    r = cfg.channels_for(D)
    key = f"order_{cfg.channel_type}"
    if key not in tensors:
        raise ArtifactError(f"double-sparsity: the artifact has no channel order {key!r} "
                            f"(has {sorted(tensors)}); re-run `accel calibrate double-sparsity`")
    order = check_channel_order(tensors[key], key, L, KVH, D, r)
    device = next(model.parameters()).device
    prefix = compat.SUPPORTED_MODEL_TYPES[compat.text_config(model.config).model_type]
    # Unquantized labels are stored in the KV dtype; quantized ones add an fp16 scale and offset.
    elt = next(model.parameters()).element_size()
    label_bytes = r * elt if cfg.label_bits >= 16 else r * cfg.label_bits // 8 + 4
    label_kind = "KV-dtype" if cfg.label_bits >= 16 else f"{cfg.label_bits}-bit"
    handler_cls, sparse = (offload_handler_class() if cfg.offload else DSAttention), {}
    for i, layer in enumerate(compat.decoder_layers(model)):
        attn, name = layer.self_attn, f"{prefix}.{i}.self_attn"
        if i < cfg.n_dense or is_sliding_layer(model, i, attn):
            ctx.add_row(name, "attention", detail="dense (" + ("first n_dense" if i < cfg.n_dense else "sliding") + ")")
            continue
        channels = order[i, :, :r].to(device=device, dtype=torch.long).contiguous()
        handler, sparse[i] = handler_cls(cfg, channels, i, device), channels
        ctx.set_attention_handler(name, attn, handler,
                                  detail=f"budget={cfg.budget:g} r={r}/{D} labels {label_kind} "
                                         f"({label_bytes} B/token/head) sink={cfg.sink} recent={cfg.recent} "
                                         f"reduce={cfg.group_reduce}")
        ctx.add_hook(attn, _stash_cache, pre=True, name=name)
        ctx.add_hook(attn, _drop_cache, pre=False, name=name)
    if cfg.offload:
        install_offload(ctx, cfg, model, sparse, lambda i: is_sliding_layer(model, i, compat.decoder_layers(model)[i].self_attn))
