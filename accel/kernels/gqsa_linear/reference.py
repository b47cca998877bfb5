"""The spec: dequantize the GQSA weight to dense and call F.linear.

x: [..., in] -> [..., out]. Computed in x's dtype from the fp32 dequantized weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .format import GQSAWeight


def gqsa_linear_reference(x: torch.Tensor, w: GQSAWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    wd = w.dequantize().to(device=x.device, dtype=x.dtype)
    return F.linear(x, wd, None if bias is None else bias.to(x.dtype))
