"""Optional C++ kernel for GQSA int4 linears on CPU (per-row layout, g = 16 or a multiple of 32).

Why native code: torch's int4 CPU kernel vectorises over output rows, so it needs every row of a
packed matrix to keep the same K-groups (the tile layout). The accurate layout keeps different
groups per row, and then the only vector direction is along K inside a group. This kernel reads
each row's kept groups once, straight from the stored format (codes, column bitmap, fp16 scales
and zeros), with AVX-512:

- codes -> bf16: one `vpmultishiftqb` spreads 32 nibbles into 16-bit lanes, one `vpermw` maps them
  to bf16 (a 32-entry table);
- `vdpbf16ps` multiplies 32 codes by the bf16 activations of two 16-channel groups (the x rows are
  contiguous per group, so two 32-byte loads);
- "exact" kernel (1-2 activation rows, and fp32 activations): codes stay integers (bf16 activations:
  as bf16 128 + q, one and-or from the nibbles; the 128 * sum(x_group) leaves with the zero point), each group's
  scale multiplies its partial sums in fp32, and the zero point enters as s*z*sum(x_group), the
  group sums gathered 16 groups at a time. fp32 activations are split into bf16 hi + lo parts,
  so the result keeps ~16 bits of each activation;
- "table" kernel (3-8 bf16 activation rows): each pair of groups gets a 32-entry bf16 table
  (q - z) * s, `vpermw` dequantises the codes once, and every activation row costs one dot
  instruction. The weights are rounded to bf16 there, exactly as the reference does for bf16.

Rows are split over torch's intra-op threads. Prefill (gqsa_amx.cpp): from AMX_ROWS bf16 rows on
(cpu.py), on a CPU with AMX, the weight is dequantized 32 rows at a time into L1 (a bf16 table of
(q - z) * s per kept group, one `vpermw` per 32 codes) and multiplied with AMX tiles
(`tdpbf16ps`, fp32 accumulation, one rounding to bf16), x as the B operand (packed once) below 64
rows, as the A operand (read in place) above; from 256 rows the whole weight is dequantized and
torch's GEMM runs on it. Without AMX, or for fp32 / fp16 activations, from PREFILL_ROWS rows on:
blocks of dequantized rows and torch's GEMM (`gqsa_linear_cpu`, gqsa_op.cpp).

The whole linear is also the C++ op `accel::gqsa_mm_cpu(x, qweight, colmask, scales, zeros,
group_size)`, defined in gqsa_op.cpp (TORCH_LIBRARY_FRAGMENT) when the extension loads; its fake
implementation is registered here, beside the load. A compiled graph calls it straight from C++
(no Python body per linear: the Python custom op `accel::gqsa_linear` costs ~18 us a call, against
kernels of 10-60 us at decode). The build needs AVX512-BF16 and AVX512-VBMI
(`-march=native`); elsewhere `available()` is False and the CPU path keeps its torch kernels.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from .. import _cpp

# The C++ sources sit beside this file (package data), compiled on first use as one translation
# unit, in this order: the decode kernels, then the host entry points, prefill path and op
# registration that use them.
_SRC_FILES = [Path(__file__).with_name(n) for n in ("gqsa_cpu.cpp", "gqsa_amx.cpp", "gqsa_op.cpp")]
_mod = None
_fake_registered = False
_fake_lock = threading.Lock()


def available() -> bool:
    """Build (once per process) and report whether the AVX-512 kernel can run here (then the op
    `accel::gqsa_mm_cpu` exists, with its fake implementation)."""
    global _mod
    if _mod is None:
        src = "\n".join(f.read_text() for f in _SRC_FILES)
        _mod = _cpp.load("gqsa_cpu", src, ["simd_available", "gqsa_mm", "gqsa_dequant_rows", "gqsa_linear_cpu",
                                           "prefill_rows", "amx_rows", "amx_available"],
                         "GQSA layouts keep the torch CPU paths")
    if _mod is not None:
        _register_fake()
    return _mod is not None and bool(_mod.simd_available())


def _register_fake() -> None:
    global _fake_registered
    with _fake_lock:
        if _fake_registered:
            return
        # Loading the extension ran its TORCH_LIBRARY_FRAGMENT: the op exists now, without a fake.
        @torch.library.register_fake("accel::gqsa_mm_cpu")
        def _(x, qweight, colmask, scales, zeros, group_size):
            torch._check(x.dim() == 2, lambda: "accel::gqsa_mm_cpu: x must be 2-D")
            return x.new_empty((x.shape[0], colmask.shape[0]))

        _fake_registered = True


def supports(group_size: int, bits: int) -> bool:
    """Layouts the kernel runs: int4, g = 16 or a multiple of 32."""
    return bits == 4 and (group_size == 16 or group_size % 32 == 0)


def dequantize_rows(qweight: torch.Tensor, colmask: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, row0: int, out: torch.Tensor) -> torch.Tensor:
    """Rows row0 .. row0 + len(out) of the dense weight into out: [n, in] (bf16 or fp32), pruned groups zero."""
    _mod.gqsa_dequant_rows(qweight, colmask, scales, zeros, group_size, row0, out)
    return out


def linear(x: torch.Tensor, qweight: torch.Tensor, colmask: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
           group_size: int) -> torch.Tensor:
    """x: [M, in] -> [M, out] in x's dtype, any M (the body of `accel::gqsa_mm_cpu`, called directly)."""
    return _mod.gqsa_linear_cpu(x, qweight, colmask, scales, zeros, group_size)


def prefill_rows() -> int:
    """Rows from which the native linear without AMX (or with fp32 / fp16 activations) dequantizes
    blocks and runs torch's GEMM (kPrefillRows)."""
    return int(_mod.prefill_rows())


def amx_rows() -> int:
    """bf16 rows from which the native linear runs its AMX prefill kernel where AMX is usable (kAmxRows)."""
    return int(_mod.amx_rows())


def amx_available() -> bool:
    """Whether this build and CPU run the AMX prefill kernel (AMX-BF16, and Linux granted the tile state)."""
    return available() and bool(_mod.amx_available())


def gqsa_mm(x: torch.Tensor, qweight: torch.Tensor, colmask: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """x: [M, in] fp32/bf16/fp16 -> [M, out] in x's dtype (fp32 accumulation). colmask: uint8 [out, ceil(n_groups / 8)] kept-group bits."""
    return _mod.gqsa_mm(x, qweight, colmask, scales, zeros, group_size)
