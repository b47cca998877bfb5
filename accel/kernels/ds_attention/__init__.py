"""Double Sparsity attention: label scoring, top-k selection (sink + recent always kept) and exact
attention over the selected K/V. Every DS formula lives in this folder; `accel.patches` calls it.

Ops (shapes in reference.py):
- `ds_decode_attention`: one decode step; validates its inputs and dispatches to the Triton kernel
  (CUDA), the fast CPU path, or the torch reference (`reference.py`, the spec) via
  `accel.kernels.dispatch.select_path`.
- `ds_decode_attention_static`: the same step over a preallocated (static) cache of which only a
  prefix is filled; the filled length is a tensor read inside the op, so a compiled step has fixed shapes.
- `ds_select`: the selection alone (the offloaded cache fetches only what it selects).
- `ds_attend_rows`: exact attention over K/V rows already gathered (the offloaded cache's fetch).
- `ds_causal_attention`: evaluation mode, the selection applied to every query row of a forward
  without a cache (body in causal.py); `ds_causal_attention_reference` is its spec.
- `ds_update_labels`: writes new keys' labels into a static label cache (in place).
- `gather_labels`: the label cache of a key tensor.

Layout: this module holds the entries (validation, path choice, `accel.kernels.ops.call`);
decode.py and causal.py the op bodies; ops.py registers them as `accel::ds_*` custom ops. Imports
go one way, entries -> ops.py -> bodies -> cpu.py / triton_kernel.py / reference.py.
"""
from __future__ import annotations

import torch

from accel.kernels import dispatch
from accel.kernels.ops import call, use_ops

# Registers torch.ops.accel.ds_* before any entry below (or in a module of this folder) can run.
from . import ops  # noqa: F401
from .causal import causal_impl, ds_causal_attention_reference
from .decode import attend_impl, decode_impl, select_impl, update_labels_impl
from .cpu import native_label_codes
from .reference import (QuantizedLabels, dense_decode_reference, dequantize_codes, ds_attend_reference, ds_attend_rows,
                        ds_select_reference, forced_budget, gather_labels, label_scores_reference)

__all__ = ["ds_decode_attention", "ds_decode_attention_static", "ds_select", "ds_select_reference",
           "ds_attend_reference", "ds_attend_rows", "ds_causal_attention", "ds_causal_attention_reference",
           "ds_update_labels", "dense_decode_reference", "gather_labels", "label_scores_reference", "forced_budget",
           "validate_inputs", "QuantizedLabels", "dequantize_codes", "native_label_codes"]

GROUP_REDUCES = ("max", "sum")


def validate_inputs(q, k, v, labels, channels, budget, sink, recent, group_reduce, key_mask) -> None:
    """Raise ValueError naming the problem when the inputs disagree with the documented shapes."""
    if isinstance(labels, QuantizedLabels):
        _validate_quantized(labels)
    for name, t in (("q", q), ("k", k), ("v", v)) + (() if isinstance(labels, QuantizedLabels) else (("labels", labels),)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ds_decode_attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"ds_decode_attention: {name} must be 4-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"ds_decode_attention: {name} must be a float tensor, got {t.dtype}")
    B, H, Tq, D = q.shape
    if Tq != 1:
        raise ValueError(f"ds_decode_attention: decode takes one query token, q has {Tq} (shape {tuple(q.shape)}); "
                         "use dense attention for prefill")
    if k.shape != v.shape:
        raise ValueError(f"ds_decode_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    Bk, KVH, T, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"ds_decode_attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if KVH < 1 or H % KVH:
        raise ValueError(f"ds_decode_attention: {H} query heads are not a multiple of {KVH} KV heads")
    if T < 1:
        raise ValueError("ds_decode_attention: the KV cache is empty (T = 0)")
    if not isinstance(channels, torch.Tensor) or channels.dim() != 2:
        raise ValueError("ds_decode_attention: channels must be a [KVH, r] integer tensor")
    if channels.dtype.is_floating_point or channels.dtype == torch.bool:
        raise ValueError(f"ds_decode_attention: channels must be integer, got {channels.dtype}")
    if channels.shape[0] != KVH:
        raise ValueError(f"ds_decode_attention: channels has {channels.shape[0]} rows, expected KVH = {KVH}")
    r = channels.shape[1]
    if r < 1 or r > D:
        raise ValueError(f"ds_decode_attention: r = {r} heavy channels must be in [1, head_dim = {D}]")
    # Range check on CPU only: on CUDA it would sync the stream every layer of every step.
    # Skipped while compiling: reading the values is data-dependent (a graph break).
    if channels.device.type == "cpu" and channels.numel() and not torch.compiler.is_compiling() \
            and ((stamp := _stamp(channels, D)) is None or getattr(channels, "_accel_range_ok", None) != stamp):
        if int(channels.min()) < 0 or int(channels.max()) >= D:
            raise ValueError(f"ds_decode_attention: channel indices must lie in [0, {D})")
        # A handler passes the same channels tensor to every step: mark it checked (for this
        # version of its data), saving two .item() syncs per layer per step.
        if stamp is not None:
            channels._accel_range_ok = stamp
    if tuple(labels.shape) != (B, KVH, T, r):
        raise ValueError(f"ds_decode_attention: labels shape {tuple(labels.shape)} != [B, KVH, T, r] = "
                         f"{(B, KVH, T, r)}")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"ds_decode_attention: budget must be an int token count, got {budget!r}")
    if budget <= 0:
        raise ValueError(f"ds_decode_attention: budget must be > 0 tokens, got {budget}")
    if sink < 0 or recent < 0:
        raise ValueError(f"ds_decode_attention: sink ({sink}) and recent ({recent}) must be >= 0")
    if group_reduce not in GROUP_REDUCES:
        raise ValueError(f"ds_decode_attention: group_reduce must be one of {GROUP_REDUCES}, got {group_reduce!r}")
    if key_mask is not None and tuple(key_mask.shape) != (B, T):
        raise ValueError(f"ds_decode_attention: key_mask shape {tuple(key_mask.shape)} != [B, T] = {(B, T)}")
    for name, t in (("k", k), ("v", v), ("labels", labels), ("channels", channels)):
        if (t.codes if isinstance(t, QuantizedLabels) else t).device != q.device:
            raise ValueError(f"ds_decode_attention: {name} is on {t.device}, q on {q.device}")


def _stamp(channels: torch.Tensor, D: int):
    """What identifies a checked channels tensor's contents; None (always check) for an inference
    tensor, which has no version counter."""
    if channels.is_inference():
        return None
    return channels._version, D


def _validate_quantized(lab: QuantizedLabels) -> None:
    codes, scale, low = lab.codes, lab.scale, lab.low
    if not all(isinstance(t, torch.Tensor) for t in (codes, scale, low)) or codes.dim() != 4:
        raise ValueError("ds_decode_attention: quantized labels need 4-D codes and scale / low tensors")
    if codes.dtype != torch.uint8 or scale.dtype != torch.float16 or low.dtype != torch.float16:
        raise ValueError(f"ds_decode_attention: quantized labels are uint8 codes with fp16 scale / low, got "
                         f"{codes.dtype}, {scale.dtype}, {low.dtype}")
    if lab.bits not in (4, 8):
        raise ValueError(f"ds_decode_attention: quantized labels have 8 or 4 bits, got {lab.bits!r}")
    if tuple(scale.shape) != (*codes.shape[:3], 1) or tuple(low.shape) != tuple(scale.shape):
        raise ValueError(f"ds_decode_attention: scale {tuple(scale.shape)} / low {tuple(low.shape)} must be "
                         f"[B, KVH, T, 1] = {(*codes.shape[:3], 1)}")
    if not lab.dtype.is_floating_point:
        raise ValueError(f"ds_decode_attention: quantized labels dequantize to a float dtype, got {lab.dtype}")


def _plain_labels(labels, path: str):
    """Quantized labels stay quantized only for the eager CPU path (which scores the codes)."""
    if isinstance(labels, QuantizedLabels) and (path != "cpu" or use_ops()):
        return labels.dequantize()
    return labels


def _resolve_path(q, path):
    path = dispatch.select_path(q.device) if path is None else path
    if path not in dispatch.PATHS:
        raise ValueError(f"ds_decode_attention: path must be one of {dispatch.PATHS}, got {path!r}")
    return path


def _scaling(q, scaling) -> float:
    return q.shape[-1] ** -0.5 if scaling is None else float(scaling)


def ds_select(q, labels, channels, budget: int, sink: int = 4, recent: int = 64, group_reduce: str = "max",
              key_mask=None, path: str | None = None) -> torch.Tensor:
    """Selected token indices [B, KVH, min(budget, T)] int64 (unordered), through the chosen path.

    Only the selection: the runtime's evaluation mode can reuse it. (`accel::ds_select` when compiling.)"""
    path = _resolve_path(q, path)
    labels = _plain_labels(labels, path)
    channels = channels.to(device=q.device, dtype=torch.long)
    return call("ds_select", select_impl, q, labels, channels, key_mask, int(budget), int(sink), int(recent),
                    group_reduce, path)


def ds_decode_attention(q, k, v, labels, channels, budget: int, sink: int = 4, recent: int = 64, scaling=None,
                        group_reduce: str = "max", key_mask=None, path: str | None = None,
                        return_indices: bool = False):
    """Double Sparsity decode attention.

    q: [B, H, 1, D] post-RoPE query; k, v: [B, KVH, T, D] (views of a bigger buffer are fine);
    labels: [B, KVH, T, r] (or `QuantizedLabels`, scored from the codes on the CPU); channels: [KVH, r] int64; budget: tokens attended in total
    (sink + recent + top-k); key_mask: [B, T] bool (True = real token) or None.
    path: None = dispatch.select_path(q.device), or "triton" | "cpu" | "reference".
    Returns out [B, H, 1, D] in q.dtype (and the selected indices [B, KVH, min(budget, T)] when
    return_indices=True). Under torch.compile: `accel::ds_decode_attention` (or `accel::ds_select`
    + `accel::ds_attend` with return_indices).
    """
    validate_inputs(q, k, v, labels, channels, budget, sink, recent, group_reduce, key_mask)
    path = _resolve_path(q, path)
    labels = _plain_labels(labels, path)
    channels = channels.to(dtype=torch.long)
    scaling = _scaling(q, scaling)
    if return_indices:
        if path == "cpu":
            from .cpu import drop_trivial_mask
            key_mask = drop_trivial_mask(key_mask)
        idx = call("ds_select", select_impl, q, labels, channels, key_mask, budget, int(sink), int(recent),
                       group_reduce, path)
        return call("ds_attend", attend_impl, q, k, v, idx, key_mask, scaling, path), idx
    return call("ds_decode_attention", decode_impl, q, k, v, labels, channels, key_mask, None, budget, 0.0, 0,
                    int(sink), int(recent), scaling, group_reduce, path)


def ds_decode_attention_static(q, k, v, labels, channels, length: torch.Tensor, budget: float, min_context: int,
                               sink: int = 4, recent: int = 64, scaling=None, group_reduce: str = "max",
                               key_mask=None, path: str | None = None) -> torch.Tensor:
    """One decode step over a static (preallocated) cache whose first `length` tokens are filled.

    k, v: [B, KVH, Tmax, D]; labels: [B, KVH, Tmax, r]; length: int tensor (0-d or [B]), the
    filled prefix (this step's token included); key_mask: [B, Tmax] or None; budget: the config's
    value (<= 1: a fraction of the context, else a token count); min_context: shorter contexts
    attend to every token. Same result as `ds_decode_attention` on the first `length` tokens with
    budget = DoubleSparsityConfig.budget_tokens(length), with fixed shapes for a compiled step."""
    validate_inputs(q, k, v, labels, channels, 1, sink, recent, group_reduce, key_mask)
    path = _resolve_path(q, path)
    frac, count = (float(budget), 0) if budget <= 1 else (0.0, int(budget))
    return call("ds_decode_attention", decode_impl, q, k, v, labels, channels.to(dtype=torch.long), key_mask,
                    length, count, frac, int(min_context), int(sink), int(recent), _scaling(q, scaling),
                    group_reduce, path)


def ds_causal_attention(q, k, v, labels, channels, budget: int, sink: int, recent: int, scaling: float | None,
                        group_reduce: str, allowed: torch.Tensor, max_elems: int = 1 << 25) -> torch.Tensor:
    """Evaluation-mode Double Sparsity attention (shapes in causal.py's docstring).
    `accel::ds_causal_attention` under torch.compile (its chunk loop tests data)."""
    scaling = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    channels = channels.to(device=q.device, dtype=torch.long)
    return call("ds_causal_attention", causal_impl, q, k, v, labels, channels, int(budget), int(sink),
                int(recent), scaling, group_reduce, allowed, int(max_elems))


def ds_update_labels(labels: torch.Tensor, key_states: torch.Tensor, channels: torch.Tensor,
                     positions: torch.Tensor) -> None:
    """Write the labels of new keys into a static label cache, in place: labels [B, KVH, Tmax, r] at
    token positions [n] (int64) <- key_states [B, KVH, n, D][..., channels [KVH, r]].
    `accel::ds_update_labels` under torch.compile."""
    call("ds_update_labels", update_labels_impl, labels, key_states, channels, positions)
