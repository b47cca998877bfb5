"""The bodies of Double Sparsity's decode ops (`accel::ds_select`, `accel::ds_attend`,
`accel::ds_decode_attention`, `accel::ds_update_labels`): each dispatches on an already resolved
`path` ("cpu" | "triton" | anything else = the reference) to cpu.py, triton_kernel.py or
reference.py. Inputs are validated by the entries in `__init__.py`; shapes in reference.py.

Layering: this module imports only the implementations. `ops.py` registers these bodies as
custom ops and `__init__.py` (the entries) calls them, so neither is imported here.
"""
from __future__ import annotations

import math

import torch

from .reference import dense_decode_reference, ds_attend_reference, ds_select_reference, gather_labels


def select_impl(q, labels, channels, key_mask, budget: int, sink: int, recent: int, group_reduce: str,
                path: str) -> torch.Tensor:
    """The body of `accel::ds_select` (inputs already validated)."""
    if path == "cpu":
        from .cpu import ds_select_cpu
        return ds_select_cpu(q, labels, channels, budget, sink, recent, group_reduce, key_mask)
    if path == "triton":
        from .triton_kernel import ds_select_triton
        return ds_select_triton(q, labels, channels, budget, sink, recent, group_reduce, key_mask)
    return ds_select_reference(q, labels, channels, budget, sink, recent, group_reduce, key_mask)


def attend_impl(q, k, v, idx, key_mask, scaling: float, path: str) -> torch.Tensor:
    """The body of `accel::ds_attend`: exact attention over idx [B, KVH, n] -> [B, H, 1, D]."""
    if path == "cpu":
        from .cpu import ds_attend_cpu
        return ds_attend_cpu(q, k, v, idx, scaling, key_mask)
    if path == "triton":
        from .triton_kernel import ds_attend_triton
        return ds_attend_triton(q, k, v, idx, scaling, key_mask)
    return ds_attend_reference(q, k, v, idx, scaling, key_mask)


def decode_impl(q, k, v, labels, channels, key_mask, length, budget: int, budget_fraction: float,
                min_context: int, sink: int, recent: int, scaling: float, group_reduce: str,
                path: str) -> torch.Tensor:
    """The body of `accel::ds_decode_attention`.

    length None: k/v/labels hold exactly the context, `budget` tokens are attended.
    length (a 0-d or [B] int tensor, a static cache's filled length): only the first
    T = max(length) tokens of k/v/labels/key_mask are the context; the budget is `budget_fraction`
    of T (rounded up, >= 1) when budget_fraction > 0, else `budget`; T < min_context attends to
    every valid token (dense math). So a static cache computes what a dynamic one of T tokens does.
    Reading `length` is data-dependent, which is why it happens inside the op."""
    if length is not None:
        T = int(length.max())
        k, v, labels = k[:, :, :T], v[:, :, :T], labels[:, :, :T]
        key_mask = None if key_mask is None else key_mask[:, :T]
        if budget_fraction > 0:
            budget = max(1, math.ceil(budget_fraction * T))
        if T < max(min_context, 1):
            if path == "cpu":
                from .cpu import dense_decode_cpu, drop_trivial_mask
                if drop_trivial_mask(key_mask) is None:
                    return dense_decode_cpu(q, k, v, scaling)
            return dense_decode_reference(q, k, v, scaling, key_mask)
    if path == "cpu":
        from .cpu import drop_trivial_mask, ds_attend_cpu, ds_select_cpu
        key_mask = drop_trivial_mask(key_mask)
        idx = ds_select_cpu(q, labels, channels, budget, sink, recent, group_reduce, key_mask)
        return ds_attend_cpu(q, k, v, idx, scaling, key_mask)
    if path == "triton":
        from .triton_kernel import ds_attend_triton, ds_select_triton
        idx = ds_select_triton(q, labels, channels, budget, sink, recent, group_reduce, key_mask)
        return ds_attend_triton(q, k, v, idx, scaling, key_mask)
    idx = ds_select_reference(q, labels, channels, budget, sink, recent, group_reduce, key_mask)
    return ds_attend_reference(q, k, v, idx, scaling, key_mask)


def update_labels_impl(labels: torch.Tensor, key_states: torch.Tensor, channels: torch.Tensor,
                       positions: torch.Tensor) -> None:
    """The body of `accel::ds_update_labels`: labels [B, KVH, Tmax, r] (in place) at token
    positions [n] <- key_states [B, KVH, n, D][..., channels]."""
    labels.index_copy_(2, positions, gather_labels(key_states, channels).to(labels.dtype))
