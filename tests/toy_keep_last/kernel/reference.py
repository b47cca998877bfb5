"""The reference of keep-last attention: one query row at a time, the kept key positions listed
explicitly, softmax written out. Slow and plain; computes in the inputs' dtype (run it in
float64 for the ground truth)."""
from __future__ import annotations

import torch


def kept_positions(p: int, n: int, sink: int) -> list[int]:
    """The key positions the query at position p attends: the first sink, then the last n - sink."""
    recent = range(max(0, p - (n - sink) + 1), p + 1)
    return sorted(set(range(min(sink, p + 1))) | set(recent))


def keep_last_attention_reference(q, k, v, n: int, sink: int, scaling: float, allowed=None):
    """q [B, H, Tq, D], k/v [B, KVH, Tk, D], allowed [B, Tq, Tk] bool or None -> [B, H, Tq, D]."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.empty_like(q)
    for i in range(Tq):
        p = Tk - Tq + i
        idx = torch.tensor(kept_positions(p, n, sink), device=q.device)
        s = torch.einsum("bhd,bhtd->bht", q[:, :, i], k[:, :, idx]) * scaling
        if allowed is not None:
            s = s.masked_fill(~allowed[:, i, idx].unsqueeze(1), float("-inf"))
        w = torch.exp(s - s.amax(-1, keepdim=True))
        out[:, :, i] = torch.einsum("bht,bhtd->bhd", w / w.sum(-1, keepdim=True), v[:, :, idx])
    return out
