"""accel's attention entry in transformers' AttentionInterface.

The registered name is "accel" (deliberately without "sdpa"/"flash", which transformers treats
specially). Each attention module may carry a handler in `module._accel_attention`; modules
without one run transformers' own SDPA function, so an unpatched layer is bit-identical to dense.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from .compat import AttentionInterface, AttentionMaskInterface, sdpa_attention_forward, sdpa_mask

ATTN_NAME = "accel"


class AttentionHandler(Protocol):
    """q: [B, H, Tq, D], k/v: [B, KVH, Tk, D] (post-RoPE, after the cache update)."""

    kernel_path: str

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs): ...


def accel_attention_forward(module, query, key, value, attention_mask, **kwargs):
    handler: Callable | None = getattr(module, "_accel_attention", None)
    if handler is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return handler(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Idempotent: register "accel" for attention and masks (the SDPA mask format)."""
    AttentionInterface.register(ATTN_NAME, accel_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
