"""Double Sparsity token selection, in pure torch.

Two entry points:
- `ds_decode_attention_spec`: one decode step, with the signature of
  `accel.kernels.ds_attention.ds_decode_attention` (used when that package is absent).
- `causal_select_attention`: the evaluation mode. The same selection applied causally to every
  query row of a no-cache forward, so perplexity measures the sparsity. Memory-bounded: it
  works through the query rows in chunks.

Selection (both): approximate score of key t = q[channels of its KV head] . labels[t], reduced
over the query heads of a GQA group with max or sum; the first `sink` and last `recent` valid
tokens are always kept (inside the budget); the rest of the budget takes the top-k approximate
scores; exact softmax attention runs over the selected tokens only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_q_labels(q: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """q: [B, H, T, D], channels: [KVH, r] -> [B, KVH, G, T, r] (G = H / KVH)."""
    B, H, T, D = q.shape
    KVH, r = channels.shape
    qg = q.reshape(B, KVH, H // KVH, T, D)
    idx = channels.to(q.device).view(1, KVH, 1, 1, r).expand(B, KVH, H // KVH, T, r)
    return qg.gather(-1, idx)


def gather_labels(k: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """k: [B, KVH, T, D], channels: [KVH, r] -> labels [B, KVH, T, r]."""
    B, KVH, T, _ = k.shape
    idx = channels.to(k.device).view(1, KVH, 1, -1).expand(B, KVH, T, channels.shape[-1])
    return k.gather(-1, idx)


def approx_scores(q: torch.Tensor, labels: torch.Tensor, channels: torch.Tensor, group_reduce: str) -> torch.Tensor:
    """q: [B, H, Tq, D], labels: [B, KVH, Tk, r] -> group-reduced scores [B, KVH, Tq, Tk] (fp32)."""
    ql = gather_q_labels(q, channels).float()
    s = torch.einsum("bkgqr,bktr->bkgqt", ql, labels.float())
    return s.amax(2) if group_reduce == "max" else s.sum(2)


def _split_budget(budget: int, sink: int, recent: int) -> tuple[int, int]:
    # Sink and recent live inside the budget; when they would not fit, sink wins, then recent.
    s = min(sink, budget)
    return s, min(recent, budget - s)


def _select(scores: torch.Tensor, allowed: torch.Tensor, budget: int, sink: int, recent: int) -> torch.Tensor:
    """scores: [B, KVH, Tq, Tk] fp32; allowed: [B, Tq, Tk] bool -> selected [B, KVH, Tq, Tk] bool."""
    Tk = scores.shape[-1]
    sink, recent = _split_budget(budget, sink, recent)
    # Rank of each key among the keys a row may see; with causal + padding masks this is the
    # key's position among the row's valid keys, so sink/recent skip left padding.
    rank = allowed.long().cumsum(-1) - 1
    count = allowed.sum(-1, keepdim=True)
    forced = allowed & ((rank < sink) | (rank >= count - recent))
    s = scores.masked_fill(forced.unsqueeze(1), float("inf"))
    s = s.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    k = min(budget, Tk)
    idx = s.topk(k, dim=-1, sorted=False).indices
    sel = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    # Rows with fewer allowed keys than the budget picked some -inf entries: drop those.
    return sel & allowed.unsqueeze(1)


def _masked_attention(q, k, v, sel, scaling):
    """q: [B, H, Tq, D], k/v: [B, KVH, Tk, D], sel: [B, KVH, Tq, Tk] -> [B, H, Tq, D] in fp32."""
    B, H, Tq, D = q.shape
    G = H // k.shape[1]
    mask = sel.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scaling,
                                          enable_gqa=G > 1)


def ds_decode_attention_spec(q, k, v, labels, channels, budget, sink=4, recent=64, scaling=None,
                             group_reduce="max", key_mask=None, path=None):
    """q: [B, H, 1, D], k/v: [B, KVH, T, D], labels: [B, KVH, T, r], channels: [KVH, r],
    key_mask: [B, T] bool (True = real token) or None -> out [B, H, 1, D] in q.dtype."""
    B, H, Tq, D = q.shape
    T = k.shape[2]
    if Tq != 1:
        raise ValueError(f"ds decode attention takes one query token, got {Tq}")
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    scaling = D ** -0.5 if scaling is None else scaling
    allowed = (torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None
               else key_mask.to(q.device, torch.bool)).unsqueeze(1)
    scores = approx_scores(q, labels, channels, group_reduce)
    sel = _select(scores, allowed, int(budget), sink, recent)
    return _masked_attention(q, k, v, sel, scaling).to(q.dtype)


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


def causal_select_attention(q, k, v, labels, channels, budget: int, sink: int, recent: int, scaling: float,
                            group_reduce: str, allowed: torch.Tensor, max_elems: int = 1 << 25) -> torch.Tensor:
    """Evaluation mode. q: [B, H, Tq, D], k/v: [B, KVH, Tk, D], labels: [B, KVH, Tk, r],
    allowed: [B, Tq, Tk] bool -> out [B, H, Tq, D] in q.dtype.

    Every query row keeps at most `budget` of the keys it may see. Rows are processed in chunks
    so the score tensor stays below `max_elems` elements.
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    chunk = max(1, min(Tq, max_elems // max(1, B * H * Tk)))
    out = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)
    for a in range(0, Tq, chunk):
        b = min(Tq, a + chunk)
        al = allowed[:, a:b]
        scores = approx_scores(q[:, :, a:b], labels, channels, group_reduce)
        sel = _select(scores, al, budget, sink, recent)
        # A row that may see no key at all (a padded query row) attends to its own position so
        # the softmax stays finite; its output is never used.
        empty = ~al.any(-1)
        if empty.any():
            pos = torch.arange(a, b, device=q.device) + (Tk - Tq)
            own = F.one_hot(pos, Tk).bool().view(1, 1, b - a, Tk)
            sel = sel | (own & empty.view(B, 1, b - a, 1))
        out[:, :, a:b] = _masked_attention(q[:, :, a:b], k, v, sel, scaling).to(q.dtype)
    return out
