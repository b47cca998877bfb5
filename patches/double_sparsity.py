"""Double Sparsity runtime: the applier. Every full-attention layer past the first `n_dense` gets a
`DSAttention` handler (patches/ds_handler.py, on the `kv_press` base) with its calibrated channels;
the first `n_dense` layers and sliding-window layers (Gemma3) stay dense. With `offload`, the
handler is `OffloadDSAttention` and the cache layers move to a slow tier (patches/ds_offload.py).
The math is in accel/kernels/ds_attention.
"""
from __future__ import annotations

import torch

from accel.artifact import ArtifactError
from accel.configs.double_sparsity import DoubleSparsityConfig

from . import compat, fast_linear
from .core import CheckpointFormat, PatchContext, register_checkpoint, register_method
from .ds_cache import GrowingLayer
from .ds_handler import DSAttention, DSDenseLayer
from .ds_offload import OffloadDSAttention, install_offload
from .kv_press import install_press, is_sliding_layer, model_dims


class _GrowHook:
    """Pre-hook on layer i's attention: before its first cache update, a plain `DynamicLayer` at
    cache.layers[i] becomes a layer that appends in place (`upgrade(layer)`: a `GrowingLayer` for
    the n_dense layers, the handler's `DSLabelLayer` for the sparse ones), so neither the prompt
    nor any decode step is concatenated. Other layer types (static, sliding, offloaded) are left
    alone. A callable object, not a closure, so that a deep-copied model's hook is the copy's."""

    def __init__(self, i: int, handler=None):
        self.i, self.handler = i, handler

    def __call__(self, module, args, kwargs):
        layers = getattr(compat.cache_from_kwargs(kwargs), "layers", None)
        if layers is None or len(layers) <= self.i or type(layers[self.i]) is not compat.DynamicLayer:
            return
        layer = layers[self.i]
        layers[self.i] = (self.handler.upgrade_layer(layer) if self.handler is not None
                          else GrowingLayer.from_layer(layer))


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
    # Unquantized labels are stored in the KV dtype; quantized ones add an fp16 scale and offset.
    elt = next(model.parameters()).element_size()
    label_bytes = r * elt if cfg.label_bits >= 16 else r * cfg.label_bits // 8 + 4
    label_kind = "KV-dtype" if cfg.label_bits >= 16 else f"{cfg.label_bits}-bit"
    handler_cls = OffloadDSAttention if cfg.offload else DSAttention

    def skip(i, attn):
        # The first n_dense layers get a DSDenseLayer (below) unless offloaded: the offload
        # handler reads their K/V back itself.
        if i < cfg.n_dense and cfg.offload:
            return "first n_dense"
        return "sliding" if is_sliding_layer(model, i, attn) else None

    def make_handler(i, attn):
        if i < cfg.n_dense:
            return DSDenseLayer(i)
        return handler_cls(cfg, order[i, :, :r].to(device=device, dtype=torch.long).contiguous(), i, device)

    sparse_detail = (f"budget={cfg.budget:g} r={r}/{D} labels {label_kind} ({label_bytes} B/token/head) "
                     f"sink={cfg.sink} recent={cfg.recent} reduce={cfg.group_reduce}")
    pressed = install_press(ctx, make_handler, skip=skip,
                            detail=lambda h: ("dense (first n_dense; CPU decode on the native kernel)"
                                              if isinstance(h, DSDenseLayer) else sparse_detail))
    handlers = {i: h for i, h in pressed.items() if not isinstance(h, DSDenseLayer)}
    if not cfg.offload:
        # Every full-attention layer's cache appends in place (the offloaded cache has its own layers).
        for i, layer in enumerate(compat.decoder_layers(model)):
            if i in handlers or not is_sliding_layer(model, i, layer.self_attn):
                ctx.add_hook(layer.self_attn, _GrowHook(i, handlers.get(i)), pre=True,
                             name=f"{compat.SUPPORTED_MODEL_TYPES[compat.text_config(model.config).model_type]}.{i}.self_attn")
    # The output head's eager GEMV: torch's bf16 GEMV at one row costs ~1/3 of a Qwen2.5-0.5B step.
    fast_linear.install_head(ctx)
    if cfg.offload:
        install_offload(ctx, cfg, model, {i: h.channels for i, h in handlers.items()},
                        lambda i: is_sliding_layer(model, i, compat.decoder_layers(model)[i].self_attn))


def _export(model, state, cfg: DoubleSparsityConfig) -> dict[str, torch.Tensor]:
    """The channel order [layers, kv_heads, head_dim] the applier takes, rebuilt from the handlers:
    each pressed layer's heavy channels first (the rest ascending), other layers 0..head_dim-1."""
    dims = model_dims(model)
    L, KVH, D = dims["layers"], dims["kv_heads"], dims["head_dim"]
    order = torch.arange(D, dtype=torch.int64).expand(L, KVH, D).clone()
    prefix = compat.SUPPORTED_MODEL_TYPES[compat.text_config(model.config).model_type] + "."
    for row in state.rows:
        ch = getattr(row.target, "channels", None)
        if row.method != "double-sparsity" or row.kind != "attention" or ch is None:
            continue
        i = int(row.module[len(prefix):].split(".", 1)[0])
        ch = ch.detach().to("cpu", torch.int64)
        rest = torch.ones(KVH, D, dtype=torch.bool)
        rest.scatter_(1, ch, False)
        order[i] = torch.cat([ch, torch.arange(D).expand(KVH, D)[rest].view(KVH, D - ch.size(1))], dim=1)
    return {f"order_{cfg.channel_type}": order}


register_checkpoint("double-sparsity", CheckpointFormat(kind="global", export=_export))
