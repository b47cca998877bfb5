"""Picks the kernel path for a device: "triton" on CUDA, "cpu" on CPU, "reference" otherwise.

`ACCEL_KERNEL=reference|cpu|triton` forces a path (for debugging and for tests that run Triton
kernels under TRITON_INTERPRET=1 on CPU tensors).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

PATHS = ("triton", "cpu", "reference")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def forced_path() -> str | None:
    v = os.environ.get("ACCEL_KERNEL", "").strip().lower()
    if not v or v == "auto":
        return None
    if v not in PATHS:
        raise ValueError(f"ACCEL_KERNEL={v!r} is not one of auto, {', '.join(PATHS)}")
    return v


def select_path(device: torch.device | str) -> str:
    forced = forced_path()
    if forced is not None:
        return forced
    device = torch.device(device)
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu":
        return "cpu"
    return "reference"


def device_guard(x: torch.Tensor):
    """`with device_guard(x):` around a Triton launch: `torch.cuda.device(x.device)` for a CUDA tensor,
    so a kernel for a layer on cuda:1 launches on cuda:1 and not on the current device (Triton
    launches on the current device; flash-attention's rule), and a no-op for a CPU tensor (the
    Triton interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
