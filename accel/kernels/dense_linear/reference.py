"""The spec of `accel::dense_linear`: F.linear. x: [..., in] -> [..., out] in x's dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)
