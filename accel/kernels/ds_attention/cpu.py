"""Fast CPU path for Double Sparsity decode attention (plain torch/aten ops, no compile).

Same semantics as `reference.py` (shapes there). What makes it fast, measured on the 2-vCPU VM at
32K tokens, H=32/KVH=8/D=128 (see `eval/bench_ds_attention.py`):
  * label scores as one batched matmul `q_lab @ labels^T` ([B, KVH, G, r] x [r, T]) and a max/sum
    over the G rows, in fp32 as the spec says, for every label dtype. Scoring bf16 labels in bf16
    (a bf16-output matmul) was ~2x faster, but its rounding (2^-8 of the score, which shares a big
    common part when the heavy channels are outliers) picked worse tokens than the spec in 10 of
    178 random bf16 cases (issue 13); aten has no fp32-output bf16 matmul on CPU, so the labels
    are upcast (measured here at T = 32K, r = 16: 1.9 ms against 0.84 ms for the bf16 matmul), or,
    with the C++ extension, widened exactly inside a native fp32-accumulating kernel (`cpp_ext.py`).
  * forced sink/recent tokens are written into the score row in place (no masks over T when there
    is no padding), then one unsorted `topk` (sorting costs 20-35% more and does not speed the gather).
  * one `index_select` per K and V over a flat [rows, D] view of the cache, into preallocated
    buffers reused across calls (a fresh buffer pays page faults on every call; advanced indexing
    and `torch.gather` are 3-5x slower than `index_select`). The buffers are per thread.
  * a grouped matmul + softmax over the selected tokens only (SDPA is 2-2.6x slower at one query).
  * fp32 without padding: the optional C++ kernel (`cpp_ext.py`) replaces the gather and both
    matmuls, reading each selected K/V row once from the cache.
"""
from __future__ import annotations

import functools
import threading

import torch

from . import cpp_ext
from .reference import QuantizedLabels, forced_budget, valid_rank

# Per-thread: two threads decoding with two models at once must not gather into one buffer
# (issue 13). A thread's buffers are only used inside one ds_attend_cpu call at a time.
_LOCAL = threading.local()


def _gather_buffers(n: int, D: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [n, D] views of this thread's buffers, kept between calls, one pair per (D, dtype, device).

    The budget grows with the context during decode, so capacity grows by 1.5x rather than being
    reallocated (and page-faulted) every time n changes."""
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    # Buffers made under inference_mode are inference tensors that cannot be written outside it
    # (e.g. `accel eval ppl` then `generate()` in one process), so each mode keeps its own pair.
    key = (D, dtype, str(device), torch.is_inference_mode_enabled())
    bufs = buffers.get(key)
    if bufs is None or bufs[0].shape[0] < n:
        cap = max(n, int(1.5 * bufs[0].shape[0]) if bufs is not None else n)
        bufs = (torch.empty(cap, D, dtype=dtype, device=device), torch.empty(cap, D, dtype=dtype, device=device))
        buffers[key] = bufs
    return bufs[0][:n], bufs[1][:n]


def _flat_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rows, D] view over x's storage and the row index of x[b, h, 0]: [B, KVH] int64.

    Works for contiguous caches and for `narrow()`ed views of a bigger buffer (token dim sliced),
    without copying; other layouts are made contiguous first."""
    B, KVH, T, D = x.shape
    s0, s1, s2, s3 = x.stride()
    if not (s3 == 1 and s2 == D and s1 % D == 0 and s0 % D == 0):
        x = x.contiguous()
        s0, s1, s2, s3 = x.stride()
    rows = (B - 1) * (s0 // D) + (KVH - 1) * (s1 // D) + T
    flat = torch.as_strided(x, (rows, D), (D, 1))
    return flat, _row_base(B, KVH, s0 // D, s1 // D, x.device)


@functools.lru_cache(maxsize=64)
def _row_base(B: int, KVH: int, rows_b: int, rows_h: int, device) -> torch.Tensor:
    """[B, KVH, 1] int64 flat row of token 0 of each (batch, KV head); cached: decode calls it per layer."""
    return (torch.arange(B, device=device)[:, None] * rows_b
            + torch.arange(KVH, device=device)[None, :] * rows_h)[..., None]


def drop_trivial_mask(key_mask):
    """None when every token is valid (the common unpadded case): the fast path needs no masks."""
    if key_mask is not None and bool(key_mask.all()):
        return None
    return key_mask


def native_label_codes(keys: torch.Tensor, channels: torch.Tensor, bits: int):
    """`quantize_labels(gather_labels(keys, channels), bits)` by the native kernel (bit-exact), or
    None where it does not run (not CPU, no extension, a traced graph, autograd, fp64 keys)."""
    # 4-bit codes pack channel pairs: an odd r (which configs refuse) keeps the torch packing.
    if (keys.device.type != "cpu" or keys.dtype not in _NATIVE_KV or bits not in (4, 8)
            or (bits == 4 and channels.shape[-1] % 2)
            or torch.compiler.is_compiling() or (torch.is_grad_enabled() and keys.requires_grad)):
        return None
    mod = cpp_ext.load()
    return None if mod is None else cpp_ext.label_quant(mod, keys, channels.to(torch.long), bits)


def ds_select_cpu(q, labels, channels, budget: int, sink: int = 4, recent: int = 64,
                  group_reduce: str = "max", key_mask=None) -> torch.Tensor:
    """Selected indices [B, KVH, min(budget, T)] int64 (unordered); see reference.ds_select_reference.
    labels: [B, KVH, T, r] float, or `QuantizedLabels` (scored natively from the codes, or dequantized)."""
    B, H, _, D = q.shape
    _, KVH, T, r = labels.shape
    G = H // KVH
    qg = q[:, :, 0, :].reshape(B, KVH, G, D)
    mod = cpp_ext.load()
    if isinstance(labels, QuantizedLabels):
        if mod is None or q.dtype == torch.float64 or labels.dtype == torch.float64:
            labels = labels.dequantize()
    # fp32 scores (fp64 for fp64 input), as reference.label_scores_reference computes them.
    cd = torch.float64 if torch.float64 in (q.dtype, labels.dtype) else torch.float32
    q_lab = torch.gather(qg, 3, channels[None, :, None, :].expand(B, KVH, G, r)).to(cd)
    if isinstance(labels, QuantizedLabels):
        # Native: each code dequantized and rounded to the cache dtype in registers, fp32 dot
        # products, work split over (KV head, token block) (B * KVH pairs alone leave threads idle).
        s = cpp_ext.label_scores_q(mod, q_lab, labels.codes, labels.scale, labels.low, labels.bits, labels.dtype,
                                   group_reduce)
    elif mod is not None and cd == torch.float32 and labels.dtype in (torch.bfloat16, torch.float16):
        # Native: widens each 16-bit label exactly and accumulates in fp32, no fp32 copy of all T labels.
        s = cpp_ext.label_scores_16(mod, q_lab, labels, group_reduce)
    else:
        # [B, KVH, G, r] @ [B, KVH, r, T] -> [B, KVH, G, T], then a max/sum over G rows (contiguous);
        # measured 2-4x faster than the [T, G] orientation, whose reduction runs over a stride-G axis.
        s = torch.matmul(q_lab, labels.to(cd).transpose(-1, -2))
        if G == 1:
            s = s[:, :, 0]
        else:
            s = s.amax(2) if group_reduce == "max" else s.sum(2)
        s = s.float()
    sink_e, recent_e = forced_budget(budget, sink, recent)
    if key_mask is None:
        # Writes into s's own fresh storage: the forced tokens outrank every score.
        if recent_e:
            s[..., T - recent_e:] = torch.finfo(s.dtype).max
        if sink_e:
            s[..., :sink_e] = float("inf")
    else:
        rank, n_valid = valid_rank(key_mask, B, T, s.device)
        valid = rank >= 0
        s.masked_fill_(~valid[:, None, :], float("-inf"))
        s.masked_fill_((valid & (rank >= n_valid[:, None] - recent_e))[:, None, :], torch.finfo(s.dtype).max)
        s.masked_fill_((valid & (rank < sink_e))[:, None, :], float("inf"))
    if mod is not None:
        # Radix select: ~2 passes over T per row instead of torch.topk's heap.
        return cpp_ext.topk_rows_f32(mod, s, min(budget, T))
    return torch.topk(s, min(budget, T), dim=-1, sorted=False).indices


# Cache dtypes the native attention reads (fp32 or 16-bit rows; fp64 stays on the torch path).
_NATIVE_KV = (torch.float32, torch.bfloat16, torch.float16)


def ds_attend_cpu(q, k, v, idx, scaling: float | None = None, key_mask=None) -> torch.Tensor:
    """Exact attention over selected tokens idx [B, KVH, n]: out [B, H, 1, D] in q.dtype."""
    B, H, _, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    n = idx.shape[-1]
    scaling = D ** -0.5 if scaling is None else scaling
    kflat, kbase = _flat_rows(k)
    vflat, vbase = _flat_rows(v)
    if key_mask is None and k.dtype == v.dtype and k.dtype in _NATIVE_KV and q.dtype in _NATIVE_KV:
        mod = cpp_ext.load()
        if mod is not None:
            # Native: reads each selected K/V row once from the cache (no gathered copies), fp32 math
            # (for a 16-bit cache: no bf16-rounded logits or weights, and no bf16 GEMMs at M = G,
            # which cost ~10x the gather here).
            out = cpp_ext.ds_attend_f32(mod, q.float(), kflat, vflat, idx + kbase, idx + vbase, G, scaling)
            return out.to(q.dtype)
    kb, vb = _gather_buffers(B * KVH * n, D, k.dtype, k.device)
    kidx = (idx + kbase).view(-1)
    torch.index_select(kflat, 0, kidx, out=kb)
    torch.index_select(vflat, 0, kidx if vbase is kbase else (idx + vbase).view(-1), out=vb)
    kb, vb = kb.view(B, KVH, n, D), vb.view(B, KVH, n, D)
    qg = q[:, :, 0, :].reshape(B, KVH, G, D).to(k.dtype)
    logits = torch.matmul(qg, kb.transpose(-1, -2)).float().mul_(scaling)      # [B, KVH, G, n]
    if key_mask is not None:
        ok = torch.gather(key_mask.bool()[:, None, :].expand(B, KVH, -1), 2, idx)
        logits.masked_fill_(~ok[:, :, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    if key_mask is not None:
        p = torch.nan_to_num_(p, nan=0.0)
    out = torch.matmul(p.to(v.dtype), vb)                                       # [B, KVH, G, D]
    return out.reshape(B, H, 1, D).to(q.dtype)


def dense_decode_cpu(q, k, v, scaling=None) -> torch.Tensor:
    """Best dense decode on CPU: grouped matmul + softmax (no repeat_kv). out [B, H, 1, D]."""
    B, H, _, D = q.shape
    KVH = k.shape[1]
    scaling = D ** -0.5 if scaling is None else scaling
    qg = q[:, :, 0, :].reshape(B, KVH, H // KVH, D)
    p = torch.softmax(torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scaling), dim=-1)
    return torch.matmul(p.to(v.dtype), v).reshape(B, H, 1, D).to(q.dtype)
