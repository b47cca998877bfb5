"""The fast path of keep-last attention on torch's SDPA: a decode step (one query) attends only
the kept keys, gathered; several query rows at once use a banded mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def band_mask(Tq: int, Tk: int, n: int, sink: int, device) -> torch.Tensor:
    """[Tq, Tk] bool: causal, and within the last n - sink positions or among the first sink."""
    dist = (torch.arange(Tk - Tq, Tk, device=device).view(Tq, 1) - torch.arange(Tk, device=device).view(1, Tk))
    return (dist >= 0) & ((dist < n - sink) | (torch.arange(Tk, device=device) < sink).view(1, Tk))


def keep_last_attention_cpu(q, k, v, n: int, sink: int, scaling: float, allowed=None):
    """q [B, H, Tq, D], k/v [B, KVH, Tk, D], allowed [B, Tq, Tk] bool or None -> [B, H, Tq, D]."""
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == 1 and allowed is None:
        keep = torch.cat([torch.arange(min(sink, Tk)), torch.arange(max(sink, Tk - (n - sink)), Tk)]).to(q.device)
        return F.scaled_dot_product_attention(q, k[:, :, keep], v[:, :, keep], scale=scaling, enable_gqa=True)
    mask = band_mask(Tq, Tk, n, sink, q.device).unsqueeze(0)
    if allowed is not None:
        mask = mask & allowed
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), scale=scaling, enable_gqa=True)
