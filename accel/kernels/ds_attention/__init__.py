"""Double Sparsity attention: label scoring, top-k selection (sink + recent always kept) and exact
attention over the selected K/V. Every DS formula lives in this folder; `accel.patches` calls it.

Ops (shapes in reference.py):
- `ds_decode_attention`: one decode step; validates its inputs and dispatches to the Triton kernel
  (CUDA), the fast CPU path, or the torch reference (`reference.py`, the spec) via
  `accel.kernels.dispatch.select_path`.
- `ds_select`: the selection alone (the offloaded cache fetches only what it selects).
- `ds_attend_rows`: exact attention over K/V rows already gathered (the offloaded cache's fetch).
- `ds_causal_attention` (causal.py): evaluation mode, the selection applied to every query row of a
  forward without a cache; `ds_causal_attention_reference` is its spec.
- `gather_labels`: the label cache of a key tensor.
"""
from __future__ import annotations

import torch

from accel.kernels import dispatch

from .causal import ds_causal_attention, ds_causal_attention_reference
from .reference import (dense_decode_reference, ds_attend_reference, ds_attend_rows, ds_select_reference,
                        forced_budget, gather_labels, label_scores_reference)

__all__ = ["ds_decode_attention", "ds_select", "ds_select_reference", "ds_attend_reference", "ds_attend_rows",
           "ds_causal_attention", "ds_causal_attention_reference", "dense_decode_reference", "gather_labels",
           "label_scores_reference", "forced_budget", "validate_inputs"]

GROUP_REDUCES = ("max", "sum")


def validate_inputs(q, k, v, labels, channels, budget, sink, recent, group_reduce, key_mask) -> None:
    """Raise ValueError naming the problem when the inputs disagree with the documented shapes."""
    for name, t in (("q", q), ("k", k), ("v", v), ("labels", labels)):
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
    if channels.device.type == "cpu" and channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= D):
        raise ValueError(f"ds_decode_attention: channel indices must lie in [0, {D})")
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
        if t.device != q.device:
            raise ValueError(f"ds_decode_attention: {name} is on {t.device}, q on {q.device}")


def _resolve_path(q, path):
    path = dispatch.select_path(q.device) if path is None else path
    if path not in dispatch.PATHS:
        raise ValueError(f"ds_decode_attention: path must be one of {dispatch.PATHS}, got {path!r}")
    return path


def ds_select(q, labels, channels, budget: int, sink: int = 4, recent: int = 64, group_reduce: str = "max",
              key_mask=None, path: str | None = None) -> torch.Tensor:
    """Selected token indices [B, KVH, min(budget, T)] int64 (unordered), through the chosen path.

    Only the selection: the runtime's evaluation mode can reuse it."""
    path = _resolve_path(q, path)
    channels = channels.to(device=q.device, dtype=torch.long)
    if path == "cpu":
        from .cpu import ds_select_cpu
        return ds_select_cpu(q, labels, channels, budget, sink, recent, group_reduce, key_mask)
    if path == "triton":
        from .triton_kernel import ds_select_triton
        return ds_select_triton(q, labels, channels, budget, sink, recent, group_reduce, key_mask)
    return ds_select_reference(q, labels, channels, budget, sink, recent, group_reduce, key_mask)


def ds_decode_attention(q, k, v, labels, channels, budget: int, sink: int = 4, recent: int = 64, scaling=None,
                        group_reduce: str = "max", key_mask=None, path: str | None = None,
                        return_indices: bool = False):
    """Double Sparsity decode attention.

    q: [B, H, 1, D] post-RoPE query; k, v: [B, KVH, T, D] (views of a bigger buffer are fine);
    labels: [B, KVH, T, r]; channels: [KVH, r] int64; budget: tokens attended in total
    (sink + recent + top-k); key_mask: [B, T] bool (True = real token) or None.
    path: None = dispatch.select_path(q.device), or "triton" | "cpu" | "reference".
    Returns out [B, H, 1, D] in q.dtype (and the selected indices [B, KVH, min(budget, T)] when
    return_indices=True).
    """
    validate_inputs(q, k, v, labels, channels, budget, sink, recent, group_reduce, key_mask)
    path = _resolve_path(q, path)
    channels = channels.to(dtype=torch.long)
    if path == "cpu":
        from .cpu import drop_trivial_mask, ds_attend_cpu, ds_select_cpu
        key_mask = drop_trivial_mask(key_mask)
        idx = ds_select_cpu(q, labels, channels, budget, sink, recent, group_reduce, key_mask)
        out = ds_attend_cpu(q, k, v, idx, scaling, key_mask)
    elif path == "triton":
        from .triton_kernel import ds_attend_triton, ds_select_triton
        idx = ds_select_triton(q, labels, channels, budget, sink, recent, group_reduce, key_mask)
        out = ds_attend_triton(q, k, v, idx, scaling, key_mask)
    else:
        idx = ds_select_reference(q, labels, channels, budget, sink, recent, group_reduce, key_mask)
        out = ds_attend_reference(q, k, v, idx, scaling, key_mask)
    return (out, idx) if return_indices else out
