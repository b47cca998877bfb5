"""Fast plain linears for compiled decode on CPU: `FastLinear`, swapped in by `accel.compile`.

A model's plain `nn.Linear`s (a dense model's, the lm_head of a patched one) run torch's bf16
GEMM, which streams its weights at ~10 GB/s for one activation row. `FastLinear` is an
`nn.Linear` whose forward takes `accel::dense_linear` (accel/kernels/dense_linear/) for bf16
inputs of a few rows and `F.linear` otherwise (prefill, fp32, autograd): same math, one rounding
to bf16, fp32 accumulation.

The swap changes each module's class in place (`module.__class__ = FastLinear`), nothing else:
the module object, its Parameters (a tied lm_head keeps sharing the embedding's weight), hooks,
`state_dict` keys and `named_modules` paths are all the same, so `save_pretrained`,
`accel.report` and `accel.patch` / `accel.unpatch` see the model they saw before (`FastLinear`
is an `nn.Linear`: a later `accel.patch` swaps it like any plain linear). The paths are recorded
on the model (`_accel_fast_linears`, plain data: a deep copy restores itself), and `remove(model)`
puts `nn.Linear` back. It is not an `accel.patch` method: it changes no result beyond rounding
order and is not saved anywhere.

Eager decode: a patch may also swap modules within `accel.patch` (`install_head(ctx)`, called by
Double Sparsity's applier for the output head, which a 1-row decode step otherwise runs on torch's
bf16 GEMV: 35 of 107 ms per Qwen2.5-0.5B step at 1 thread). That swap is recorded in the patch
state (`SwapClass`, undone by `accel.unpatch`) and shown by `accel.report` as a "fast-linear" row;
it claims nothing, so a later weight method may still replace the module.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from accel.kernels.dense_linear import cpp_ext
from accel.kernels.dense_linear.cpu import dense_linear

log = logging.getLogger(__name__)


class FastLinear(nn.Linear):
    """`nn.Linear` computing with `accel::dense_linear` where it applies (x: [..., in] -> [..., out])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, self.bias)


def _eligible(m: nn.Module) -> bool:
    # Exactly nn.Linear (subclasses have their own forward), bf16 weights on the CPU: the only case
    # the kernel computes; other linears would only gain a branch.
    w = getattr(m, "weight", None)
    return (type(m) is nn.Linear and isinstance(w, torch.Tensor) and w.device.type == "cpu"
            and w.dtype == torch.bfloat16 and (m.bias is None or m.bias.dtype == torch.bfloat16))


def apply(model: nn.Module) -> list[str]:
    """Make every eligible plain nn.Linear of `model` a FastLinear (idempotent); returns the paths
    swapped by this call. Nothing is swapped when the kernel cannot run here (no AVX512-BF16, no
    compiler, ACCEL_CPP=0)."""
    todo = [(name, m) for name, m in model.named_modules() if _eligible(m)]
    if not todo:
        return []
    if not cpp_ext.available():
        log.info("fast linears: the native kernel is not available here; plain linears keep F.linear")
        return []
    for _, m in todo:
        m.__class__ = FastLinear
    done = [name for name, _ in todo]
    log.info("fast linears: %d plain linears take accel::dense_linear", len(done))
    return done


def remove(model: nn.Module) -> int:
    """Put nn.Linear back on every FastLinear of `model`; returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is FastLinear:
            m.__class__ = nn.Linear
            n += 1
    return n


def swapped(model: nn.Module) -> list[str]:
    """Paths of the modules that are FastLinears now (a tied module once, under its first path)."""
    return [name for name, m in model.named_modules() if type(m) is FastLinear]


KERNEL_PATH = "dense-native"


@dataclass
class SwapClass:
    """Undo record (patches/undo.py protocol): the FastLinear at `path` becomes nn.Linear again.
    A module that is no longer a FastLinear there (replaced since, or swapped back) is left alone."""
    path: str

    def undo(self, root: nn.Module) -> None:
        try:
            m = root.get_submodule(self.path)
        except AttributeError:
            return
        if type(m) is FastLinear:
            m.__class__ = nn.Linear


class _Row:
    """A report row's target: which kernel the swapped module runs."""
    kernel_path = KERNEL_PATH


def install_head(ctx) -> list[str]:
    """Within an applier: make the model's output head (`get_output_embeddings()`) a FastLinear
    when it is a plain bf16 CPU nn.Linear and the native kernel runs here; recorded for undo and
    report. Returns the swapped paths ([] when nothing applies: fp32, GPU, a replaced head)."""
    model = ctx.model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not _eligible(head) or not cpp_ext.available():
        return []
    name = next(n for n, m in model.named_modules() if m is head)
    head.__class__ = FastLinear
    ctx.state.undo.append(SwapClass(name))
    ctx.add_row(name, "fast-linear", _Row(), "eager decode of <= 8 bf16 rows on accel::dense_linear")
    log.info("fast linears: %s takes accel::dense_linear", name)
    return [name]
