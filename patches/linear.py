"""Base class for the linears that methods swap in, and the identity linear."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from accel.kernels.dispatch import select_path


class AccelLinear(nn.Module):
    """A drop-in for `nn.Linear` (x: [..., in] -> [..., out]).

    Subclasses implement `forward` and say which kernel path they take for a device.
    """

    method = "dense"

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    @property
    def kernel_path(self) -> str:
        dev = next(iter(self.buffers()), None)
        dev = dev if dev is not None else next(iter(self.parameters()), None)
        return select_path(dev.device if dev is not None else torch.device("cpu"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}"

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))


class IdentityLinear(AccelLinear):
    """Shares the original Linear's parameters and computes exactly what it computed."""

    method = "identity"
    kernel_path = "dense"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features)
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
