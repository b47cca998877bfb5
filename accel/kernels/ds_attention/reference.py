"""Double Sparsity attention: the pure-torch spec, and the one place its math is written.

Shapes (one decode step):
    q:        [B, H, 1, D]    post-RoPE query
    k, v:     [B, KVH, T, D]  full K/V cache
    labels:   [B, KVH, T, r]  label cache = k[..., channels] (post-RoPE; `gather_labels`), any float dtype
    channels: [KVH, r]        int64 heavy channels of each KV head
    key_mask: [B, T] bool     True = real token (left padding = False); None = all valid
    G = H // KVH query heads share each KV head (GQA).

Selection (`ds_select_reference`; `row_scores_reference` + `select_rows_reference` do the same for
every query row of a causal forward, see causal.py), per (batch, KV head):
  1. s[b, kvh, g, t] = q[b, kvh*G + g, channels[kvh]] . labels[b, kvh, t]   (fp32, or fp64 for fp64 input)
  2. s[b, kvh, t] = max_g or sum_g of s[b, kvh, g, t]   (`group_reduce`)
  3. The first `sink` and the last `recent` *valid* tokens are always kept. Both count inside the
     budget; if `sink + recent > budget` the sink keeps priority: sink_e = min(sink, budget),
     recent_e = min(recent, budget - sink_e).
  4. The other `budget - (#forced)` slots take the top-k of the remaining valid tokens by s.
  5. Padded tokens are never selected ahead of a valid one; if fewer than `budget` tokens are
     valid the leftover slots point at padded tokens and the attention masks them out.
  Returns idx: [B, KVH, min(budget, T)] int64, in no particular order.

Attention (`ds_attend_reference`: gather the selected rows, then `ds_attend_rows`): exact softmax(q . k * scaling) v over the selected tokens only,
per query head, in fp32 (fp64 for fp64 input), returned in q.dtype. With budget >= the number of
valid tokens this is exactly dense attention over the valid tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def forced_budget(budget: int, sink: int, recent: int) -> tuple[int, int]:
    """(sink_e, recent_e): the always-kept counts actually used for a given budget."""
    sink_e = min(sink, budget)
    return sink_e, min(recent, budget - sink_e)


def valid_rank(key_mask: torch.Tensor | None, B: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """key_mask [B, T] (or [B, Tq, T]: one mask per query row) -> rank [B, (Tq,) T] int64, the
    position of each token among the valid ones (-1 for padded); n_valid [B, (Tq)] int64."""
    if key_mask is None:
        rank = torch.arange(T, device=device).expand(B, T)
        return rank, torch.full((B,), T, dtype=torch.long, device=device)
    m = key_mask.bool()
    rank = torch.where(m, m.long().cumsum(-1) - 1, torch.full_like(m, -1, dtype=torch.long))
    return rank, m.long().sum(-1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Min-max quantized labels back to `dtype`: codes uint8 [..., r] (8-bit) or [..., r/2] (4-bit,
    channel 2i in the low nibble), scale / low [..., 1] fp16 -> [..., r] = code * scale + low
    (fp32), rounded to dtype."""
    if bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)
    return (codes.float() * scale.float() + low.float()).to(dtype)


class QuantizedLabels(NamedTuple):
    """A label cache stored min-max quantized (patches/ds_cache.quantize_labels), passed to the
    decode entries as it is stored: the CPU path scores the codes directly (no dequantized copy of
    all T labels per step); every other path dequantizes first. Its labels are exactly
    `dequantize()`: [B, KVH, T, r] in `dtype`.

    codes: [B, KVH, T, r] or [B, KVH, T, r/2] (4-bit) uint8; scale, low: [B, KVH, T, 1] fp16."""
    codes: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    bits: int
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        B, KVH, T, rc = self.codes.shape
        return torch.Size((B, KVH, T, rc * 2 if self.bits == 4 else rc))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dim(self) -> int:
        return 4

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scale, self.low, self.bits, self.dtype)


def gather_labels(k: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The label cache of keys k: [B, KVH, T, D], channels: [KVH, r] -> labels [B, KVH, T, r] = k[..., channels]."""
    B, KVH, T, _ = k.shape
    idx = channels.to(k.device).view(1, KVH, 1, -1).expand(B, KVH, T, channels.shape[-1])
    return k.gather(-1, idx)


def row_scores_reference(q: torch.Tensor, labels: torch.Tensor, channels: torch.Tensor,
                         group_reduce: str = "max") -> torch.Tensor:
    """Approximate scores of every query row: q [B, H, Tq, D] -> [B, KVH, Tq, T] (fp32/fp64),
    q's heavy channels . labels, reduced over the G query heads of each KV head (step 1-2)."""
    B, H, Tq, D = q.shape
    KVH, r = channels.shape
    G = H // KVH
    cd = _compute_dtype(q, labels)
    qg = q.reshape(B, KVH, G, Tq, D).to(cd)
    # q_lab[b, kvh, g, i, c] = q[b, kvh*G + g, i, channels[kvh, c]]
    q_lab = torch.gather(qg, 4, channels.to(q.device)[None, :, None, None, :].expand(B, KVH, G, Tq, r))
    s = torch.einsum("bkgic,bktc->bkgit", q_lab, labels.to(cd))
    return s.amax(2) if group_reduce == "max" else s.sum(2)


def label_scores_reference(q: torch.Tensor, labels: torch.Tensor, channels: torch.Tensor,
                           group_reduce: str = "max") -> torch.Tensor:
    """Approximate scores [B, KVH, T] (fp32/fp64) of one decode query q [B, H, 1, D]."""
    return row_scores_reference(q[:, :, :1], labels, channels, group_reduce)[:, :, 0]


def select_rows_reference(scores: torch.Tensor, allowed: torch.Tensor | None, budget: int, sink: int,
                          recent: int) -> torch.Tensor:
    """Steps 3-5 for every query row. scores: [B, KVH, Tq, T]; allowed: [B, Tq, T] bool (the keys
    each row may see: padding and, for a causal forward, the future are False) or None (all)
    -> idx [B, KVH, Tq, min(budget, T)] int64, unordered."""
    B, KVH, Tq, T = scores.shape
    if allowed is None:
        allowed = torch.ones(B, Tq, T, dtype=torch.bool, device=scores.device)
    rank, n_valid = valid_rank(allowed.expand(B, Tq, T), B, T, scores.device)    # [B, Tq, T], [B, Tq]
    sink_e, recent_e = forced_budget(budget, sink, recent)
    valid = rank >= 0
    is_sink = valid & (rank < sink_e)
    is_recent = valid & (rank >= (n_valid[..., None] - recent_e))
    # Priority order: sink (+inf), then recent (float max), then the approximate score; padded -inf.
    # forced_budget guarantees the forced tokens fit, so they are never cut by the top-k.
    key = scores.masked_fill(~valid[:, None], float("-inf"))
    key = key.masked_fill(is_recent[:, None], torch.finfo(scores.dtype).max)
    key = key.masked_fill(is_sink[:, None], float("inf"))
    return torch.topk(key, min(budget, T), dim=-1, sorted=False).indices


def ds_select_reference(q, labels, channels, budget: int, sink: int = 4, recent: int = 64,
                        group_reduce: str = "max", key_mask=None) -> torch.Tensor:
    """Selected token indices [B, KVH, min(budget, T)] int64 (unordered). See the module docstring."""
    s = row_scores_reference(q[:, :, :1], labels, channels, group_reduce)
    allowed = None if key_mask is None else key_mask.bool()[:, None, :]
    return select_rows_reference(s, allowed, budget, sink, recent)[:, :, 0]


def ds_attend_rows(q, ks, vs, ok=None, scaling: float | None = None) -> torch.Tensor:
    """Exact attention of one decode query over gathered K/V rows.

    q: [B, H, 1, D]; ks, vs: [B, KVH, n, D] (the selected tokens of each KV head, any order);
    ok: [B, KVH, n] bool (False = a padded token, masked out) or None -> out [B, H, 1, D] in
    q.dtype. fp32 math (fp64 for fp64 input); a head with no valid row outputs 0."""
    B, H, _, D = q.shape
    KVH = ks.shape[1]
    G = H // KVH
    scaling = D ** -0.5 if scaling is None else scaling
    cd = _compute_dtype(q, ks, vs)
    qg = q[:, :, 0, :].reshape(B, KVH, G, D).to(cd)
    logits = torch.einsum("bkgd,bknd->bkgn", qg, ks.to(cd)) * scaling        # [B, KVH, G, n]
    if ok is not None:
        logits = logits.masked_fill(~ok[:, :, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    # A row with no valid token at all gives NaN from softmax; define its output as 0.
    p = torch.nan_to_num(p, nan=0.0)
    out = torch.einsum("bkgn,bknd->bkgd", p, vs.to(cd))
    return out.reshape(B, H, 1, D).to(q.dtype)


def ds_attend_reference(q, k, v, idx, scaling: float | None = None, key_mask=None) -> torch.Tensor:
    """Exact attention over the selected tokens. idx: [B, KVH, n] -> out [B, H, 1, D] in q.dtype."""
    D = q.shape[-1]
    gi = idx[..., None].expand(*idx.shape, D)
    ok = None
    if key_mask is not None:
        ok = torch.gather(key_mask.bool()[:, None, :].expand(-1, k.shape[1], -1), 2, idx)   # [B, KVH, n]
    return ds_attend_rows(q, torch.gather(k, 2, gi), torch.gather(v, 2, gi), ok, scaling)


def dense_decode_reference(q, k, v, scaling=None, key_mask=None) -> torch.Tensor:
    """Dense decode attention over all valid tokens (fp32/fp64 math): out [B, H, 1, D] in q.dtype."""
    B, KVH, T, _ = k.shape
    idx = torch.arange(T, device=k.device).expand(B, KVH, T)
    return ds_attend_reference(q, k, v, idx, scaling, key_mask)
