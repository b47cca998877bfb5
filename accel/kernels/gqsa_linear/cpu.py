"""Fast CPU paths for GQSA linears.

- "cpu-avx512" (first choice): the native kernel in `cpp_ext.py` for int4 with g = 16 or a
  multiple of 32, any layout (per-row or tiled). It reads the stored tensors in place (no second
  copy of the weight): 1-8 activation rows per weight pass; from AMX_ROWS bf16 rows on (a CPU with
  AMX), AMX tile GEMMs on weight blocks dequantized in cache; else from PREFILL_ROWS rows on, blocks
  of dequantized rows and torch's GEMM. Needs a C++ compiler and a CPU with AVX512-BF16/VBMI;
  otherwise (or with ACCEL_CPP=0) the torch paths below run.

`torch.ops.aten._weight_int4pack_mm_for_cpu` (bf16 activations) computes
`x @ ((q - 8) * s + z')^T` with per-(K-group, N) scale/zero, K-group in {32, 64, 128, 256}.
Measured on the 2-vCPU dev VM (eval/bench_gqsa.py): it is torch's fastest CPU GEMV for
int4 weights, and group sparsity only pays when the pruned K-groups are *compacted away*. So, for
4-bit weights only:

- "cpu-int4-compact": the layout is tile-structured (each tile of `tile_rows` rows keeps the same
  groups) and g is a multiple of 32. Each tile becomes one dense int4 matrix over its kept
  columns: y[:, tile] = int4mm(x[:, kept_cols], W_tile). Work and bytes scale with 1 - sparsity.
- "cpu-int4-masked": g is a multiple of 32 but rows keep different groups: dense int4 over all of
  K with the pruned groups' scale and zero set to 0 (int4 speed, no gain from sparsity).
- "cpu-dequant": anything else (g = 8/16/24, 2/3/8 bits): dequantize and F.linear per call
  (slow, exact; the reference's math).

Rounding, stated: the int4 kernels hold s and z' = (8 - zero) * s in bf16 (the format stores
fp16), so their weights differ from the reference's by ~2^-9 relative (SQNR > 35 dB on random
weights, tests/test_gqsa.py); they take bf16 activations only. fp32 and fp16 activations on an
int4-path weight run the exact "cpu-dequant" math instead (their rounding to bf16 would cost
8 or 3 bits); a kernel prepared for them (CPUGQSA(dtype=...), which GQSALinear sets from the
model's dtype) is "cpu-dequant" from the start and builds no int4 copy. 2/3/8-bit weights never take the int4 kernels: their codes would fit, but the bf16
z' error grows with the scale, i.e. with fewer bits (W3 0.9%, W2 3% off at the logits).
The native "cpu-avx512" path (4-bit only) splits fp32/fp16 activations into bf16 hi + lo parts
below PREFILL_ROWS rows: ~16 bits per activation, relative error ~1e-5 (documented in cpp_ext.py);
from PREFILL_ROWS rows on it dequantizes to fp32 and is exact.
Our asymmetric w = (q - zero) * s maps onto the aten convention with z' = (8 - zero) * s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops  # the generic use_ops(); this folder's op is gqsa_linear/ops.py
from . import cpp_ext
from .format import GQSAWeight

_int4mm = torch.ops.aten._weight_int4pack_mm_for_cpu
_int4pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu


def aten_group(g: int) -> int | None:
    """Largest aten group size dividing g (scales are then repeated g // Ga times), or None."""
    for ga in (256, 128, 64, 32):
        if g % ga == 0:
            return ga
    return None


def _tiles(w: GQSAWeight) -> list[tuple[int, int]] | None:
    """Row ranges that share kept groups, or None if the layout is not tile-structured."""
    out, t = w.out_features, max(1, w.tile_rows)
    if t <= 1:
        return None
    ranges = [(r0, min(out, r0 + t)) for r0 in range(0, out, t)]
    for r0, r1 in ranges:
        # The aten packer needs a multiple of 16 output rows per packed matrix.
        if (r1 - r0) % 16:
            return None
        if not bool((w.cols[r0:r1] == w.cols[r0:r0 + 1]).all()):
            return None
    return ranges


def _scale_zeros(s: torch.Tensor, z: torch.Tensor, reps: int) -> torch.Tensor:
    """s, z: [rows, groups] -> aten's [groups * reps, rows, 2] bf16 with z' = (8 - z) * s."""
    zp = (8.0 - z) * s
    sz = torch.stack([s, zp], -1).repeat_interleave(reps, dim=1)
    return sz.transpose(0, 1).contiguous().to(torch.bfloat16)


# Batch sizes at which the native op changes path (kAmxRows / kPrefillRows in gqsa_op.cpp, mirrored
# here for documentation and tests): bf16 batches of AMX_ROWS rows or more run AMX tile GEMMs on
# weight blocks dequantized in cache, where AMX is usable (gqsa_amx.cpp); without AMX, and for
# fp32 / fp16 activations, batches of PREFILL_ROWS rows or more dequantize blocks of rows and run
# torch's GEMM; fewer rows run the kernel's 1-8-row passes. Scratch is per call or per thread
# (issue 13: a shared buffer let two threads' prefills overwrite each other's weight blocks).
AMX_ROWS = 8
PREFILL_ROWS = 64


def avx512_linear(x2: torch.Tensor, qweight: torch.Tensor, colmask: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The native "cpu-avx512" path (the body of `accel::gqsa_linear` on CPU): x2 [M, in] -> [M, out]
    in x2's dtype; no bias. The C++ function behind the op `accel::gqsa_mm_cpu`, called directly."""
    return cpp_ext.linear(x2, qweight, colmask, scales, zeros, group_size)


class CPUGQSA:
    """Prepared CPU form of one GQSAWeight. x: [M, in] (any float dtype) -> [M, out] in x's dtype.

    dtype: the activation dtype it is prepared for. The int4 kernels take bf16 only, so for any
    other dtype the torch paths choose "cpu-dequant" and build no int4 copy that would never run
    (`path` then names what runs). Other dtypes still compute correctly (see __call__)."""

    def __init__(self, w: GQSAWeight, native: bool = True, dtype: torch.dtype = torch.bfloat16):
        self.out_features, self.in_features = w.out_features, w.in_features
        self.dtype = dtype
        # native=False keeps the torch paths (benchmarks compare them with the native kernel).
        if native and cpp_ext.supports(w.group_size, w.bits) and cpp_ext.available():
            self.path = "cpu-avx512"
            self.w = w
            # The module's own buffers, read in place: no second copy of the weight.
            self.tensors = [w.qweight, w.colmask, w.scales, w.zeros]
            return
        # Only 4-bit codes are what the int4 kernels compute (see the module docstring).
        ga = aten_group(w.group_size) if w.bits == 4 and w.out_features % 16 == 0 else None
        if dtype != torch.bfloat16:
            ga = None  # fp32/fp16 activations would run the exact math anyway (module docstring)
        tiles = _tiles(w) if ga else None
        self.tensors: list[torch.Tensor] = []
        if ga is None:
            self.path = "cpu-dequant"
            self.w = w
            self.tensors = [w.qweight, w.cols, w.scales, w.zeros]
            return
        g, reps = w.group_size, w.group_size // ga
        self.ga = ga
        self._source = w  # the stored format: the exact path for non-bf16 activations reads it
        codes = w.codes().to(torch.int32)  # [out, k, g]
        s, z = w.scales.float(), w.zeros.float()
        if tiles is not None:
            self.path = "cpu-int4-compact"
            self.parts = []
            idxs = []
            for r0, r1 in tiles:
                idx = (w.cols[r0].long()[:, None] * g + torch.arange(g)).reshape(-1)
                packed = _int4pack(codes[r0:r1].reshape(r1 - r0, -1).contiguous(), 1)
                sz = _scale_zeros(s[r0:r1], z[r0:r1], reps)
                self.parts.append((len(idxs) * idx.numel(), idx.numel(), packed, sz))
                idxs.append(idx)
                self.tensors += [packed, sz]
            # One gather of x for all tiles; each tile then reads its own slice.
            self.idx = torch.cat(idxs)
            self.tensors.append(self.idx)
        else:
            self.path = "cpu-int4-masked"
            full = torch.full((self.out_features, w.in_features // g, g), 8, dtype=torch.int32)
            full.scatter_(1, w.cols.long()[:, :, None].expand(-1, -1, g), codes)
            sf = torch.zeros(self.out_features, w.in_features // g)
            zf = torch.full_like(sf, 8.0)
            sf.scatter_(1, w.cols.long(), s)
            zf.scatter_(1, w.cols.long(), z)
            self.packed = _int4pack(full.view(self.out_features, -1).contiguous(), 1)
            self.sz = _scale_zeros(sf, zf, reps)
            self.tensors = [self.packed, self.sz]

    def _dequantized(self) -> torch.Tensor:
        """fp32 [out, in], rebuilt per call (no second resident copy of the weight)."""
        if self.path == "cpu-dequant":
            return self.w.dequantize()
        return self._source.dequantize()

    def _avx512(self, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w = self.w
        if ops.use_ops():
            # The C++ op `accel::gqsa_mm_cpu` (defined when cpp_ext loaded, which choosing this path
            # did): opaque to torch.compile, and the compiled graph calls it without a Python body
            # (the Python op `accel::gqsa_linear` cost ~18 us a call, ~3.8 ms per SmolLM2 token).
            return torch.ops.accel.gqsa_mm_cpu(x2, w.qweight, w.colmask, w.scales, w.zeros, w.group_size)
        return avx512_linear(x2, w.qweight, w.colmask, w.scales, w.zeros, w.group_size)

    def nbytes(self) -> int:
        """Bytes of the weight as the kernel reads it (cpu-avx512: the stored tensors themselves;
        the int4 paths: their repacked copy, held beside the stored format)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        if shape[-1] != self.in_features:
            # The native kernel takes K from x: a wrong width would read the wrong activations.
            raise ValueError(f"GQSA linear expects {self.in_features} input features, got {shape[-1]}")
        x2 = x.reshape(-1, shape[-1])
        if self.path == "cpu-avx512":
            y = self._avx512(x2, dtype)
        elif self.path == "cpu-dequant" or dtype != torch.bfloat16:
            # fp32/fp16 activations on an int4-path weight: the exact math, not a bf16 rounding.
            y = F.linear(x2, self._dequantized().to(dtype))
        else:
            # The aten kernel is fast only with bf16 activations (10-17x slower with fp32).
            xb = x2.to(torch.bfloat16)
            if self.path == "cpu-int4-masked":
                y = _int4mm(xb, self.packed, self.ga, self.sz)
            else:
                xg = xb.index_select(1, self.idx)
                y = torch.cat([_int4mm(xg[:, o:o + n].contiguous(), packed, self.ga, sz)
                               for o, n, packed, sz in self.parts], dim=1)
            y = y.to(dtype)
        if bias is not None:
            y = y + bias.to(dtype)
        return y.reshape(*shape[:-1], self.out_features)
