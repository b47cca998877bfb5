"""Double Sparsity decode attention: the pure-torch spec.

Shapes (one decode step):
    q:        [B, H, 1, D]    post-RoPE query
    k, v:     [B, KVH, T, D]  full K/V cache
    labels:   [B, KVH, T, r]  label cache = k[..., channels] (post-RoPE), any float dtype
    channels: [KVH, r]        int64 heavy channels of each KV head
    key_mask: [B, T] bool     True = real token (left padding = False); None = all valid
    G = H // KVH query heads share each KV head (GQA).

Selection (`ds_select_reference`), per (batch, KV head):
  1. s[b, kvh, g, t] = q[b, kvh*G + g, channels[kvh]] . labels[b, kvh, t]   (fp32, or fp64 for fp64 input)
  2. s[b, kvh, t] = max_g or sum_g of s[b, kvh, g, t]   (`group_reduce`)
  3. The first `sink` and the last `recent` *valid* tokens are always kept. Both count inside the
     budget; if `sink + recent > budget` the sink keeps priority: sink_e = min(sink, budget),
     recent_e = min(recent, budget - sink_e).
  4. The other `budget - (#forced)` slots take the top-k of the remaining valid tokens by s.
  5. Padded tokens are never selected ahead of a valid one; if fewer than `budget` tokens are
     valid the leftover slots point at padded tokens and the attention masks them out.
  Returns idx: [B, KVH, min(budget, T)] int64, in no particular order.

Attention (`ds_attend_reference`): exact softmax(q . k * scaling) v over the selected tokens only,
per query head, in fp32 (fp64 for fp64 input), returned in q.dtype. With budget >= the number of
valid tokens this is exactly dense attention over the valid tokens.
"""
from __future__ import annotations

import torch


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def forced_budget(budget: int, sink: int, recent: int) -> tuple[int, int]:
    """(sink_e, recent_e): the always-kept counts actually used for a given budget."""
    sink_e = min(sink, budget)
    return sink_e, min(recent, budget - sink_e)


def valid_rank(key_mask: torch.Tensor | None, B: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """rank: [B, T] int64 position of each token among the valid ones (-1 for padded);
    n_valid: [B] int64."""
    if key_mask is None:
        rank = torch.arange(T, device=device).expand(B, T)
        return rank, torch.full((B,), T, dtype=torch.long, device=device)
    m = key_mask.bool()
    rank = torch.where(m, m.long().cumsum(-1) - 1, torch.full_like(m, -1, dtype=torch.long))
    return rank, m.long().sum(-1)


def label_scores_reference(q: torch.Tensor, labels: torch.Tensor, channels: torch.Tensor,
                           group_reduce: str = "max") -> torch.Tensor:
    """Approximate scores [B, KVH, T] (fp32/fp64): q's heavy channels . labels, reduced over the group."""
    B, H, _, D = q.shape
    KVH, r = channels.shape
    G = H // KVH
    cd = _compute_dtype(q, labels)
    qg = q[:, :, 0, :].reshape(B, KVH, G, D).to(cd)
    # q_lab[b, kvh, g, c] = q[b, kvh*G + g, channels[kvh, c]]
    q_lab = torch.gather(qg, 3, channels.to(q.device)[None, :, None, :].expand(B, KVH, G, r))
    s = torch.einsum("bkgc,bktc->bkgt", q_lab, labels.to(cd))
    return s.amax(2) if group_reduce == "max" else s.sum(2)


def ds_select_reference(q, labels, channels, budget: int, sink: int = 4, recent: int = 64,
                        group_reduce: str = "max", key_mask=None) -> torch.Tensor:
    """Selected token indices [B, KVH, min(budget, T)] int64 (unordered). See the module docstring."""
    B, KVH, T, _ = labels.shape
    s = label_scores_reference(q, labels, channels, group_reduce)
    rank, n_valid = valid_rank(key_mask, B, T, labels.device)
    sink_e, recent_e = forced_budget(budget, sink, recent)
    valid = rank >= 0
    is_sink = valid & (rank < sink_e)
    is_recent = valid & (rank >= (n_valid[:, None] - recent_e))
    # Priority order: sink (+inf), then recent (float max), then the approximate score; padded -inf.
    # forced_budget guarantees the forced tokens fit, so they are never cut by the top-k.
    key = s.masked_fill(~valid[:, None, :], float("-inf"))
    key = key.masked_fill(is_recent[:, None, :], torch.finfo(s.dtype).max)
    key = key.masked_fill(is_sink[:, None, :], float("inf"))
    k = min(budget, T)
    return torch.topk(key, k, dim=-1, sorted=False).indices


def ds_attend_reference(q, k, v, idx, scaling: float | None = None, key_mask=None) -> torch.Tensor:
    """Exact attention over the selected tokens. idx: [B, KVH, n] -> out [B, H, 1, D] in q.dtype."""
    B, H, _, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    scaling = D ** -0.5 if scaling is None else scaling
    cd = _compute_dtype(q, k, v)
    gi = idx[..., None].expand(*idx.shape, D)
    ks = torch.gather(k, 2, gi).to(cd)                                   # [B, KVH, n, D]
    vs = torch.gather(v, 2, gi).to(cd)
    qg = q[:, :, 0, :].reshape(B, KVH, G, D).to(cd)
    logits = torch.einsum("bkgd,bknd->bkgn", qg, ks) * scaling         # [B, KVH, G, n]
    if key_mask is not None:
        ok = torch.gather(key_mask.bool()[:, None, :].expand(B, KVH, -1), 2, idx)   # [B, KVH, n]
        logits = logits.masked_fill(~ok[:, :, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    # A row with no valid token at all gives NaN from softmax; define its output as 0.
    p = torch.nan_to_num(p, nan=0.0)
    out = torch.einsum("bkgn,bknd->bkgd", p, vs)
    return out.reshape(B, H, 1, D).to(q.dtype)


def ds_decode_attention_reference(q, k, v, labels, channels, budget: int, sink: int = 4, recent: int = 64,
                                  scaling=None, group_reduce: str = "max", key_mask=None) -> torch.Tensor:
    """Selection + exact attention over the selected tokens: out [B, H, 1, D] in q.dtype."""
    idx = ds_select_reference(q, labels, channels, budget, sink, recent, group_reduce, key_mask)
    return ds_attend_reference(q, k, v, idx, scaling, key_mask)


def dense_decode_reference(q, k, v, scaling=None, key_mask=None) -> torch.Tensor:
    """Dense decode attention over all valid tokens (fp32/fp64 math): out [B, H, 1, D] in q.dtype."""
    B, KVH, T, _ = k.shape
    idx = torch.arange(T, device=k.device).expand(B, KVH, T)
    return ds_attend_reference(q, k, v, idx, scaling, key_mask)
