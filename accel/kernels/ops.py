"""accel's kernels as `torch.library` custom ops (namespace `accel`), so `torch.compile` traces a
patched model without graph breaks.

Each op is registered once, for every device: its implementation dispatches inside on a `path`
string (the paths of `dispatch.select_path`: "cpu" / "cpu-avx512", "triton", "reference"), and
its fake implementation gives the output's shape and dtype to the compiler. The ops are opaque to
Dynamo, so what they do inside (native C++ calls, `Tensor.item()`, data-dependent shapes such as
`nonzero`) never breaks a graph.

| op | what | Python entry that routes to it |
|---|---|---|
| `accel::ds_decode_attention` | one DS decode step; with `length`, over a static cache | `ds_attention.ds_decode_attention`, `ds_decode_attention_static` |
| `accel::ds_select` | the DS selection alone | `ds_attention.ds_select` |
| `accel::ds_attend` | exact attention over selected tokens | `ds_decode_attention(..., return_indices=True)` |
| `accel::ds_causal_attention` | DS over every row of a cacheless forward | `ds_attention.ds_causal_attention` |
| `accel::ds_update_labels` | write labels of new keys into a static label cache (in place) | `patches.ds_cache.DSStaticLabelLayer` |
| `accel::gqsa_linear` | GQSA linear on the native AVX-512 kernel or Triton | `gqsa_linear.cpu.CPUGQSA`, `gqsa_linear_triton` |
| `accel::rsparse_linear` | R-Sparse linear (CPU path incl. the C++ GEMV, Triton, reference) | `rsparse_linear`, `rsparse_linear_cpu` |

Eager calls skip the op and run the same implementation directly (`call`): a custom-op dispatch
costs ~60 us here, against decode GEMVs of tens of microseconds (a SmolLM2 decode step makes ~200
such calls). Under `torch.compile` (`torch.compiler.is_compiling()`), or with `ACCEL_OPS=1`, the
op is called. Either way the same Python function computes the result.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.library import custom_op

NAMESPACE = "accel"
OPS = ("ds_decode_attention", "ds_select", "ds_attend", "ds_causal_attention", "ds_update_labels",
       "gqsa_linear", "rsparse_linear")


def use_ops() -> bool:
    """Whether Python entries go through the registered ops (compiling, or ACCEL_OPS=1)."""
    return torch.compiler.is_compiling() or _FORCE


_FORCE = os.environ.get("ACCEL_OPS", "0") == "1"


def call(name: str, impl, *args):
    """`torch.ops.accel.<name>(*args)` when tracing (or ACCEL_OPS=1), else `impl(*args)`."""
    if use_ops():
        return getattr(torch.ops.accel, name)(*args)
    return impl(*args)


# ---- Double Sparsity ------------------------------------------------------------------------------
@custom_op("accel::ds_decode_attention", mutates_args=())
def ds_decode_attention(q: Tensor, k: Tensor, v: Tensor, labels: Tensor, channels: Tensor, key_mask: Tensor | None,
                        length: Tensor | None, budget: int, budget_fraction: float, min_context: int, sink: int,
                        recent: int, scaling: float, group_reduce: str, path: str) -> Tensor:
    """q [B, H, 1, D] -> out [B, H, 1, D] in q.dtype. See `ds_attention.decode_impl`."""
    from .ds_attention import decode_impl
    return decode_impl(q, k, v, labels, channels, key_mask, length, budget, budget_fraction, min_context, sink,
                       recent, scaling, group_reduce, path)


@ds_decode_attention.register_fake
def _(q, k, v, labels, channels, key_mask, length, budget, budget_fraction, min_context, sink, recent, scaling,
      group_reduce, path):
    return q.new_empty(q.shape)


@custom_op("accel::ds_select", mutates_args=())
def ds_select(q: Tensor, labels: Tensor, channels: Tensor, key_mask: Tensor | None, budget: int, sink: int,
              recent: int, group_reduce: str, path: str) -> Tensor:
    """-> idx [B, KVH, min(budget, T)] int64."""
    from .ds_attention import select_impl
    return select_impl(q, labels, channels, key_mask, budget, sink, recent, group_reduce, path)


@ds_select.register_fake
def _(q, labels, channels, key_mask, budget, sink, recent, group_reduce, path):
    B, KVH, T, _ = labels.shape
    return q.new_empty((B, KVH, min(budget, T)), dtype=torch.long)


@custom_op("accel::ds_attend", mutates_args=())
def ds_attend(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, key_mask: Tensor | None, scaling: float,
              path: str) -> Tensor:
    """Exact attention over idx [B, KVH, n] -> out [B, H, 1, D] in q.dtype."""
    from .ds_attention import attend_impl
    return attend_impl(q, k, v, idx, key_mask, scaling, path)


@ds_attend.register_fake
def _(q, k, v, idx, key_mask, scaling, path):
    return q.new_empty(q.shape)


@custom_op("accel::ds_causal_attention", mutates_args=())
def ds_causal_attention(q: Tensor, k: Tensor, v: Tensor, labels: Tensor, channels: Tensor, budget: int, sink: int,
                        recent: int, scaling: float, group_reduce: str, allowed: Tensor, max_elems: int) -> Tensor:
    """q [B, H, Tq, D] -> out [B, H, Tq, D] in q.dtype (evaluation mode)."""
    from .ds_attention.causal import causal_impl
    return causal_impl(q, k, v, labels, channels, budget, sink, recent, scaling, group_reduce, allowed, max_elems)


@ds_causal_attention.register_fake
def _(q, k, v, labels, channels, budget, sink, recent, scaling, group_reduce, allowed, max_elems):
    return q.new_empty(q.shape)


@custom_op("accel::ds_update_labels", mutates_args=("labels",))
def ds_update_labels(labels: Tensor, key_states: Tensor, channels: Tensor, positions: Tensor) -> None:
    """labels [B, KVH, Tmax, r] (in place) at token positions [n] <- key_states [B, KVH, n, D][..., channels]."""
    update_labels_impl(labels, key_states, channels, positions)


def update_labels_impl(labels: Tensor, key_states: Tensor, channels: Tensor, positions: Tensor) -> None:
    """The body of `accel::ds_update_labels`."""
    from .ds_attention.reference import gather_labels
    labels.index_copy_(2, positions, gather_labels(key_states, channels).to(labels.dtype))


@ds_update_labels.register_fake
def _(labels, key_states, channels, positions):
    return None


# ---- GQSA -------------------------------------------------------------------------------------------
@custom_op("accel::gqsa_linear", mutates_args=())
def gqsa_linear(x: Tensor, qweight: Tensor, colmask: Tensor, cols: Tensor | None, scales: Tensor, zeros: Tensor,
                bias: Tensor | None, in_features: int, group_size: int, bits: int, tile_rows: int, path: str,
                block_n: int, splits: int, force: str) -> Tensor:
    """x [..., in] -> [..., out] in x.dtype. path: "cpu-avx512" (x must be 2-D; no bias: the caller
    adds it) or "triton" (block_n / splits (0 = auto) / force ("" = auto) as `gqsa_linear_triton`)."""
    if path == "cpu-avx512":
        from .gqsa_linear.cpu import avx512_linear
        return avx512_linear(x, qweight, colmask, scales, zeros, group_size)
    if path == "triton":
        from .gqsa_linear.triton_kernel import triton_impl
        return triton_impl(x, qweight, colmask, cols, scales, zeros, bias, in_features, group_size, bits,
                           tile_rows, block_n, splits, force)
    raise ValueError(f"accel::gqsa_linear: path must be 'cpu-avx512' or 'triton', got {path!r}")


@gqsa_linear.register_fake
def _(x, qweight, colmask, cols, scales, zeros, bias, in_features, group_size, bits, tile_rows, path, block_n,
      splits, force):
    return x.new_empty((*x.shape[:-1], colmask.shape[0]))


# ---- R-Sparse ---------------------------------------------------------------------------------------
@custom_op("accel::rsparse_linear", mutates_args=())
def rsparse_linear(x: Tensor, weight: Tensor, scale: Tensor, threshold: float, down: Tensor | None,
                   up: Tensor | None, bias: Tensor | None, weight_t: Tensor | None, thr_vec: Tensor | None,
                   path: str) -> Tensor:
    """x [..., in] -> [..., out] in x.dtype through path "cpu" | "triton" | "reference"."""
    from .rsparse_linear import rsparse_impl
    return rsparse_impl(x, weight, scale, threshold, down, up, bias, weight_t, thr_vec, path)


@rsparse_linear.register_fake
def _(x, weight, scale, threshold, down, up, bias, weight_t, thr_vec, path):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
