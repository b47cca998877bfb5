"""(2) The kernel folder of keep-last: the op, dispatched by path.

    keep_last_attention(q, k, v, n, sink, scaling=None, allowed=None, path="cpu")

q: [B, H, Tq, D]; k, v: [B, KVH, Tk, D] with H a multiple of KVH; the queries are the last Tq of
the Tk positions. allowed: [B, Tq, Tk] bool (transformers' mask as keys each row may see) or None.
Query at position p attends key j iff j <= p and (j < sink or j > p - (n - sink)), and allowed.
Returns [B, H, Tq, D]. "reference" is reference.py; "cpu" (also used on CUDA: this toy has no
Triton kernel, a real method adds triton_kernel.py and a "triton" branch here) is cpu.py.
"""
from __future__ import annotations

from .reference import keep_last_attention_reference


def check_inputs(q, k, v, n: int, sink: int, allowed=None) -> None:
    """ValueError naming the argument whose shape or value does not fit."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"keep_last_attention: q, k, v must be [B, H, T, D] with k and v alike, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1] or k.shape[2] < Tq:
        raise ValueError(f"keep_last_attention: k {tuple(k.shape)} does not fit q {tuple(q.shape)} (same B and D, "
                         f"H a multiple of KVH, at least Tq keys)")
    if not (n >= 1 and 0 <= sink < n):
        raise ValueError(f"keep_last_attention: need n >= 1 and 0 <= sink < n, got n={n} sink={sink}")
    if allowed is not None and tuple(allowed.shape) != (B, Tq, k.shape[2]):
        raise ValueError(f"keep_last_attention: allowed must be [B, Tq, Tk] = {(B, Tq, k.shape[2])}, got "
                         f"{tuple(allowed.shape)}")


def keep_last_attention(q, k, v, n: int, sink: int, scaling=None, allowed=None, *, path: str = "cpu"):
    check_inputs(q, k, v, n, sink, allowed)
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    if path in ("cpu", "triton"):
        from .cpu import keep_last_attention_cpu
        return keep_last_attention_cpu(q, k, v, n, sink, scaling, allowed)
    return keep_last_attention_reference(q, k, v, n, sink, scaling, allowed)
