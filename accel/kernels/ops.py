"""The generic machinery of accel's `torch.library` custom ops (namespace `accel`), so
`torch.compile` traces a patched model without graph breaks. This module imports no kernel package.

Each kernel folder registers its own ops beside its implementation, in `<folder>/ops.py`, which
the folder's `__init__.py` imports: Python runs a package's `__init__` before any of its modules,
so an op exists whenever one of its Python entries can be called. Imports go one way:
entry -> `<folder>/ops.py` -> implementation modules (which import neither).

Each op is registered once, for every device: its implementation dispatches inside on a `path`
string (the paths of `dispatch.select_path`: "cpu" / "cpu-avx512", "triton", "reference"), and
its fake implementation gives the output's shape and dtype to the compiler. The ops are opaque to
Dynamo, so what they do inside (native C++ calls, `Tensor.item()`, data-dependent shapes such as
`nonzero`) never breaks a graph.

| op | registered in | body | Python entry that routes to it |
|---|---|---|---|
| `accel::ds_decode_attention` | `ds_attention/ops.py` | `ds_attention/decode.py` `decode_impl` | `ds_attention.ds_decode_attention`, `ds_decode_attention_static` |
| `accel::ds_select` | `ds_attention/ops.py` | `decode.py` `select_impl` | `ds_attention.ds_select` |
| `accel::ds_attend` | `ds_attention/ops.py` | `decode.py` `attend_impl` | `ds_decode_attention(..., return_indices=True)` |
| `accel::ds_causal_attention` | `ds_attention/ops.py` | `ds_attention/causal.py` `causal_impl` | `ds_attention.ds_causal_attention` |
| `accel::ds_update_labels` (in place) | `ds_attention/ops.py` | `decode.py` `update_labels_impl` | `ds_attention.ds_update_labels` (`patches.ds_cache.DSStaticLabelLayer`) |
| `accel::gqsa_linear` | `gqsa_linear/ops.py` | `cpu.avx512_linear`, `triton_kernel.triton_impl` | `gqsa_linear.triton_kernel.gqsa_linear_triton` (and a fallback for the CPU path) |
| `accel::gqsa_mm_cpu` (C++) | `gqsa_linear/gqsa_op.cpp` (fake: `gqsa_linear/cpp_ext.py`) | `gqsa_op.cpp` `gqsa_linear_cpu` | `gqsa_linear.cpu.CPUGQSA` ("cpu-avx512") |
| `accel::rsparse_decode` (C++) | `rsparse_linear/bf16_src.py` (fake: `rsparse_linear/cpp_ext.py`) | `bf16_src.py` `rsparse_decode` | `rsparse_linear.cpu.rsparse_linear_cpu` (bf16/fp32, 1-8 rows) |
| `accel::dense_linear` (C++) | `dense_linear/dense_cpu.cpp` (fake: `dense_linear/cpp_ext.py`) | `dense_cpu.cpp` | `patches.fast_linear.FastLinear` (`accel.compile`) |
| `accel::rsparse_linear` | `rsparse_linear/ops.py` | `rsparse_linear/impl.py` `rsparse_impl` | `rsparse_linear.rsparse_linear`, `rsparse_linear.cpu.rsparse_linear_cpu` |

`accel::gqsa_mm_cpu`, `accel::rsparse_decode` and `accel::dense_linear` are C++ ops
(TORCH_LIBRARY_FRAGMENT in the native extensions): each exists once its folder's
`cpp_ext.available()` has loaded the extension (which choosing the "cpu-avx512"
path does), so it is listed in NATIVE_OPS, not OPS. A compiled graph calls it with no Python body
(~2 us of dispatch a call, against ~18 us for a Python custom op at 2 threads).

Eager calls skip the op and run the same implementation directly (`call`): a custom-op dispatch
costs ~60 us here, against decode GEMVs of tens of microseconds (a SmolLM2 decode step makes ~200
such calls). Under `torch.compile` (`torch.compiler.is_compiling()`), or with `ACCEL_OPS=1`, the
op is called. Either way the same Python function computes the result.
"""
from __future__ import annotations

import os

import torch

NAMESPACE = "accel"
# Registered by ds_attention/ops.py, gqsa_linear/ops.py and rsparse_linear/ops.py (table above).
OPS = ("ds_decode_attention", "ds_select", "ds_attend", "ds_causal_attention", "ds_update_labels",
       "gqsa_linear", "rsparse_linear")
# C++ ops, defined when their extension loads (table above).
NATIVE_OPS = ("gqsa_mm_cpu", "rsparse_decode", "dense_linear")


def use_ops() -> bool:
    """Whether Python entries go through the registered ops (compiling, or ACCEL_OPS=1)."""
    return torch.compiler.is_compiling() or _FORCE


_FORCE = os.environ.get("ACCEL_OPS", "0") == "1"


def call(name: str, impl, *args):
    """`torch.ops.accel.<name>(*args)` when tracing (or ACCEL_OPS=1), else `impl(*args)`.
    The op must be registered: the caller is an entry of the kernel folder that registers it."""
    if use_ops():
        return getattr(torch.ops.accel, name)(*args)
    return impl(*args)
