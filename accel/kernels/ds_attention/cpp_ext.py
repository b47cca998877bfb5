"""Optional C++ kernels for the DS CPU path, built on first use: attention over the selected tokens
(fp32, no padding mask), an unordered top-k (radix select) and fp32 label scores over bf16/fp16
labels.

Why native code: the torch path gathers the selected K and V rows into buffers (`index_select`:
read + write) and then reads the copies again in two matmuls; at 32K tokens and 1/16 that gather
is the largest cost of a DS decode step. This kernel reads each selected K row and V row once,
straight from the cache: per (batch, KV head), logits of the G query heads, softmax, and the
weighted V sum, with (batch, KV head) pairs split over torch's intra-op threads.

Same math as `cpu.ds_attend_cpu` (fp32 accumulation; results differ only in summation order).
Without a compiler, or with ACCEL_CPP=0, `load()` gives None and the torch path runs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import _cpp

# The C++ source (read only when building): attention over selected tokens, top-k, label scores.
_SRC = Path(__file__).with_name("ds_attend.cpp")


def load():
    """The built extension, or None (the caller keeps the torch path)."""
    return _cpp.load("ds_attend_v7", _SRC, ["ds_attend_f32", "ds_attend_16", "topk_rows_f32", "label_scores_16",
                                         "label_scores_q", "label_quant"],
                     "DS decode uses torch's gather and topk")


def topk_rows_f32(mod, s: torch.Tensor, k: int) -> torch.Tensor:
    """s: [..., T] fp32 -> [..., k] int64 indices of the k largest (unordered; ties broken arbitrarily)."""
    lead = s.shape[:-1]
    return mod.topk_rows_f32(s.reshape(-1, s.shape[-1]).contiguous(), int(k)).view(*lead, int(k))


def label_scores_16(mod, q_lab: torch.Tensor, labels: torch.Tensor, group_reduce: str) -> torch.Tensor:
    """q_lab: [B, KVH, G, r] fp32; labels: [B, KVH, T, r] bf16/fp16 -> [B, KVH, T] fp32 (max/sum over G)."""
    B, KVH, G, r = q_lab.shape
    T = labels.shape[2]
    if labels.stride(3) != 1:
        labels = labels.contiguous()
    lab = labels.reshape(B * KVH, T, r)
    return mod.label_scores_16(q_lab.reshape(B * KVH, G, r).contiguous(), lab, group_reduce == "max").view(B, KVH, T)


def ds_attend_f32(mod, q: torch.Tensor, kflat: torch.Tensor, vflat: torch.Tensor, krows: torch.Tensor,
                  vrows: torch.Tensor, G: int, scaling: float) -> torch.Tensor:
    """q: [B, H, 1, D] fp32; kflat/vflat: [rows, D] fp32, or both bf16 / both fp16 (widened exactly,
    fp32 math); krows/vrows: [B, KVH, n] flat rows -> [B, H, 1, D] fp32."""
    B, H, _, D = q.shape
    BK = krows.shape[0] * krows.shape[1]
    fn = mod.ds_attend_f32 if kflat.dtype == torch.float32 else mod.ds_attend_16
    out = fn(q.reshape(B * H, D).contiguous(), kflat, vflat, krows.reshape(BK, -1).contiguous(),
                            vrows.reshape(BK, -1).contiguous(), G, float(scaling))
    return out.view(B, H, 1, D)


# Cache dtypes labels are dequantized to, as the native kernel's rounding code.
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def label_scores_q(mod, q_lab: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int,
                   dtype: torch.dtype, group_reduce: str) -> torch.Tensor:
    """Label scores over quantized labels, without dequantizing them into a tensor.

    q_lab: [B, KVH, G, r] fp32; codes: [B, KVH, T, r] (8-bit) or [B, KVH, T, r/2] (4-bit) uint8;
    scale, low: [B, KVH, T, 1] fp16 (patches/ds_cache.quantize_labels); dtype: what the labels
    would be dequantized to (fp32, bf16, fp16; each label is rounded to it, as
    `dequantize_labels(..., dtype)` does) -> [B, KVH, T] fp32 (max/sum over G)."""
    B, KVH, G, r = q_lab.shape
    T = codes.shape[2]
    if codes.stride(3) != 1:
        codes = codes.contiguous()
    return mod.label_scores_q(q_lab.reshape(B * KVH, G, r).contiguous(), codes.reshape(B * KVH, T, codes.shape[3]),
                              scale.reshape(B * KVH, T), low.reshape(B * KVH, T), int(bits), _ROUND[dtype],
                              group_reduce == "max").view(B, KVH, T)


def label_quant(mod, keys: torch.Tensor, channels: torch.Tensor, bits: int):
    """`quantize_labels(gather_labels(keys, channels), bits)` in one native pass (same bits):
    keys [B, KVH, n, D] fp32/bf16/fp16, channels [KVH, r] int64 -> (codes, scale, low)."""
    return tuple(mod.label_quant(keys, channels.contiguous(), int(bits)))
