"""Double Sparsity's `torch.library` custom ops (namespace `accel`, see accel/kernels/ops.py).

Registered when this folder is imported (`__init__.py` imports this module): `accel::ds_decode_attention`,
`accel::ds_select`, `accel::ds_attend`, `accel::ds_causal_attention`, `accel::ds_update_labels`.
Each op's body is the implementation in decode.py / causal.py; its fake implementation gives
torch.compile the output's shape and dtype. This module imports only those implementations.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from .causal import causal_impl
from .decode import attend_impl, decode_impl, select_impl, update_labels_impl


@custom_op("accel::ds_decode_attention", mutates_args=())
def ds_decode_attention(q: Tensor, k: Tensor, v: Tensor, labels: Tensor, channels: Tensor, key_mask: Tensor | None,
                        length: Tensor | None, budget: int, budget_fraction: float, min_context: int, sink: int,
                        recent: int, scaling: float, group_reduce: str, path: str) -> Tensor:
    """q [B, H, 1, D] -> out [B, H, 1, D] in q.dtype. See `decode.decode_impl`."""
    return decode_impl(q, k, v, labels, channels, key_mask, length, budget, budget_fraction, min_context, sink,
                       recent, scaling, group_reduce, path)


@ds_decode_attention.register_fake
def _(q, k, v, labels, channels, key_mask, length, budget, budget_fraction, min_context, sink, recent, scaling,
      group_reduce, path):
    return q.new_empty(q.shape)


@custom_op("accel::ds_select", mutates_args=())
def ds_select(q: Tensor, labels: Tensor, channels: Tensor, key_mask: Tensor | None, budget: int, sink: int,
              recent: int, group_reduce: str, path: str) -> Tensor:
    """-> idx [B, KVH, min(budget, T)] int64."""
    return select_impl(q, labels, channels, key_mask, budget, sink, recent, group_reduce, path)


@ds_select.register_fake
def _(q, labels, channels, key_mask, budget, sink, recent, group_reduce, path):
    B, KVH, T, _ = labels.shape
    return q.new_empty((B, KVH, min(budget, T)), dtype=torch.long)


@custom_op("accel::ds_attend", mutates_args=())
def ds_attend(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, key_mask: Tensor | None, scaling: float,
              path: str) -> Tensor:
    """Exact attention over idx [B, KVH, n] -> out [B, H, 1, D] in q.dtype."""
    return attend_impl(q, k, v, idx, key_mask, scaling, path)


@ds_attend.register_fake
def _(q, k, v, idx, key_mask, scaling, path):
    return q.new_empty(q.shape)


@custom_op("accel::ds_causal_attention", mutates_args=())
def ds_causal_attention(q: Tensor, k: Tensor, v: Tensor, labels: Tensor, channels: Tensor, budget: int, sink: int,
                        recent: int, scaling: float, group_reduce: str, allowed: Tensor, max_elems: int) -> Tensor:
    """q [B, H, Tq, D] -> out [B, H, Tq, D] in q.dtype (evaluation mode)."""
    return causal_impl(q, k, v, labels, channels, budget, sink, recent, scaling, group_reduce, allowed, max_elems)


@ds_causal_attention.register_fake
def _(q, k, v, labels, channels, budget, sink, recent, scaling, group_reduce, allowed, max_elems):
    return q.new_empty(q.shape)


@custom_op("accel::ds_update_labels", mutates_args=("labels",))
def ds_update_labels(labels: Tensor, key_states: Tensor, channels: Tensor, positions: Tensor) -> None:
    """labels [B, KVH, Tmax, r] (in place) at token positions [n] <- key_states [B, KVH, n, D][..., channels]."""
    update_labels_impl(labels, key_states, channels, positions)


@ds_update_labels.register_fake
def _(labels, key_states, channels, positions):
    return None
