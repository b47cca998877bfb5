"""Double Sparsity over every query row of a forward without a KV cache (evaluation mode).

Each query row i keeps at most `budget` of the keys it may see (`allowed[b, i]`: causal and
padding), chosen exactly as a decode step at that position would choose them (reference.py,
steps 1-5), and attends to them only; so perplexity measures the sparsity decode would apply.

Shapes:
    q:        [B, H, Tq, D]     k, v: [B, KVH, Tk, D]     labels: [B, KVH, Tk, r]
    channels: [KVH, r] int64    allowed: [B, Tq, Tk] bool  -> out [B, H, Tq, D] in q.dtype

`causal_impl` (the body of `accel::ds_causal_attention`, whose entry `ds_causal_attention` is in
`__init__.py`): the selection of a chunk of rows at once (`row_scores_reference` +
`select_rows_reference`), scattered into a boolean mask, then one masked SDPA per chunk; chunks
keep the [B, KVH, rows, Tk] score tensor under `max_elems`. On CPU (fp32 / 16-bit inputs)
causal_cpp.py does both steps natively for every row at once: the selection, then an exact fp32
softmax over each row's selected keys (about a tenth of the torch path's time at seq 2048).
`ds_causal_attention_reference` (the spec): one decode step (`ds_select_reference` +
`ds_attend_reference`) per row. A row that may see no key (a padded query row) is unspecified in both (finite; the
torch op attends it to its own position, the native one and the spec give 0): no output of a padded row is ever used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import causal_cpp
from .reference import (ds_attend_reference, ds_select_reference, forced_budget, row_scores_reference,
                        select_rows_reference)


def causal_impl(q, k, v, labels, channels, budget: int, sink: int, recent: int, scaling: float, group_reduce: str,
                allowed: torch.Tensor, max_elems: int) -> torch.Tensor:
    """The body of `accel::ds_causal_attention`."""
    # The native pass (CPU, fp32/16-bit inputs; fp64 keeps the torch spec's precision): no
    # [rows, Tk] tensor, one pass over every row.
    native = (causal_cpp.load() if q.device.type == "cpu" and torch.float64 not in (q.dtype, labels.dtype)
              else None)
    if native is not None:
        idx = causal_cpp.select_rows(native, q, labels, channels, group_reduce, allowed, budget,
                                     *forced_budget(budget, sink, recent))
        return causal_cpp.attend_rows(native, q, k, v, idx, allowed, scaling).to(q.dtype)
    B, H, Tq, D = q.shape
    KVH, Tk = k.shape[1], k.shape[2]
    G = H // KVH
    chunk = max(1, min(Tq, max_elems // max(1, B * H * Tk)))
    out = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)
    for a in range(0, Tq, chunk):
        b = min(Tq, a + chunk)
        al = allowed[:, a:b]
        idx = select_rows_reference(row_scores_reference(q[:, :, a:b], labels, channels, group_reduce), al,
                                    budget, sink, recent)
        # Rows with fewer allowed keys than the budget picked some masked ones: `& al` drops them.
        sel = torch.zeros(B, KVH, b - a, Tk, dtype=torch.bool, device=q.device).scatter_(-1, idx, True)
        sel &= al[:, None]
        empty = ~al.any(-1)
        if empty.any():
            # Keeps the softmax of a row with no key finite (see the module docstring).
            pos = torch.arange(a, b, device=q.device) + (Tk - Tq)
            own = F.one_hot(pos, Tk).bool().view(1, 1, b - a, Tk)
            sel = sel | (own & empty.view(B, 1, b - a, 1))
        out[:, :, a:b] = F.scaled_dot_product_attention(
            q[:, :, a:b].float(), k.float(), v.float(), attn_mask=sel.repeat_interleave(G, dim=1), scale=scaling,
            enable_gqa=G > 1).to(q.dtype)
    return out


def ds_causal_attention_reference(q, k, v, labels, channels, budget: int, sink: int, recent: int,
                                  scaling: float | None, group_reduce: str, allowed: torch.Tensor) -> torch.Tensor:
    """The spec: row i is the decode step of query i over the keys it may see. Slow (a loop)."""
    B, H, Tq, D = q.shape
    out = torch.zeros(B, H, Tq, D, dtype=q.dtype, device=q.device)
    for i in range(Tq):
        for bi in range(B):
            m = allowed[bi, i]
            if not bool(m.any()):
                continue
            qi = q[bi:bi + 1, :, i:i + 1]
            idx = ds_select_reference(qi, labels[bi:bi + 1], channels, budget, sink, recent, group_reduce, m[None])
            out[bi:bi + 1, :, i:i + 1] = ds_attend_reference(qi, k[bi:bi + 1], v[bi:bi + 1], idx, scaling, m[None])
    return out
