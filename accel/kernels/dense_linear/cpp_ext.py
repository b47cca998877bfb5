"""Optional C++ kernel `accel::dense_linear`: bf16 linears of 1..MAX_ROWS activation rows on CPU.

Why native code: in a compiled SmolLM2 decode step torch's bf16 `aten::mm` for one activation row
streams its weights at ~10 GB/s (25.7 of ~31 ms per token, 2 threads), while the machine streams
30-50 GB/s. The kernel is a plain GEMV built for that case:

- `vdpbf16ps` multiplies 32 bf16 weights by 32 bf16 activations into 16 fp32 lanes; one load of a
  weight row feeds every activation row (up to 4 at a time); 8 weight rows per pass for one
  activation row (8 independent accumulators hide the instruction's latency);
- K % 32 tails by masked loads (zeros past the row), fp32 accumulation, the bias added in fp32,
  one rounding to bf16 at the end (round to nearest even), as torch's bf16 GEMM does;
- output rows split over torch's intra-op threads (`at::parallel_for`), each thread at least
  ~64 KiB of weights (smaller work runs on one thread: a fork/join costs more).

The op is defined in C++ (`TORCH_LIBRARY_FRAGMENT(accel, m)`, CPU kernel by `TORCH_LIBRARY_IMPL`),
so inductor's generated code calls it through the dispatcher with no Python body (a Python
`custom_op` costs ~18 us a call here, against GEMVs of 10-70 us). Its fake implementation (the
output's shape) is registered here, from Python, once the library is loaded.

Any other case (fp32/fp16, more than MAX_ROWS rows, a CPU without AVX512-BF16) the op runs
`at::linear`, so it is always correct; `available()` is False where the build or the CPU lacks
the instructions, and callers then keep `F.linear`.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from .. import _cpp

_SRC_FILE = Path(__file__).with_name("dense_cpu.cpp")
_mod = None
_fake_done = False
# True once available() has built the kernel and registered the op in this process: cpu.usable()
# reads it, so a FastLinear in a process that never asked (an unpickled model) runs F.linear
# instead of calling an op that does not exist yet.
READY = False
_lock = threading.Lock()
# Mirrors MAX_ROWS in dense_cpu.cpp (checked against the built library in available()).
MAX_ROWS = 8


def _fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def available() -> bool:
    """Build (once per process) and report whether the AVX512-BF16 kernel and its op exist here."""
    global _mod, _fake_done, READY
    # _cpp.load builds every kernel with -fopenmp (at::parallel_for needs it to use threads).
    _mod = _cpp.load("dense_linear", _SRC_FILE, ["simd_available", "max_rows"], "plain linears keep F.linear")
    if _mod is None or not bool(_mod.simd_available()):
        return False
    if not _fake_done:
        with _lock:
            if not _fake_done:
                assert int(_mod.max_rows()) == MAX_ROWS, "dense_cpu.cpp MAX_ROWS differs from cpp_ext.MAX_ROWS"
                torch.library.register_fake("accel::dense_linear")(_fake)
                _fake_done = True
    READY = True
    return True
