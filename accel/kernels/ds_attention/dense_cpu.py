"""Dense decode attention on CPU (one query token, every cached key), for the layers Double Sparsity
leaves dense (`n_dense`, and every layer while the context is below `min_context`).

torch's CPU flash attention is written for many query rows; at one row and an 8K context it cost
~4 ms per layer on SmolLM2 with 2 threads, half of a DS + GQSA decode step spent in its 2 dense
layers. The native kernel (dense_decode.cpp) splits the context into chunks over (batch, KV head,
chunk) and combines the chunks' softmax partials: it reads K and V once and keeps both threads
busy whatever the number of KV heads. The spec is `reference.dense_decode_reference` (fp64 in the tests).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import _cpp

_SRC = Path(__file__).with_name("dense_decode.cpp")
# Tokens per work item: 256 rows of K and V (64 KB at D = 64 in bf16) stay in L2, and an 8K
# context gives 32 items per KV head, enough to balance 2-16 threads.
CHUNK = 256


def load():
    """The built extension, or None (callers keep torch's attention)."""
    return _cpp.load("ds_dense_decode_v1", _SRC, ["dense_decode"], "dense DS layers decode with torch's SDPA")


def usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `dense_decode` takes these: CPU, one query token, K/V of one float dtype whose rows
    are D contiguous elements (a cache grown in place qualifies; a transposed view does not)."""
    return (query.device.type == "cpu" and query.dim() == 4 and query.shape[2] == 1 and key.dim() == 4
            and key.dtype == value.dtype and key.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and key.shape == value.shape and key.shape[-1] == query.shape[-1]
            and key.stride(-1) == value.stride(-1) == 1 and key.stride(-2) == value.stride(-2) == key.shape[-1]
            and query.shape[1] % max(key.shape[1], 1) == 0 and load() is not None)


def dense_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                 key_mask: torch.Tensor | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """query: [B, H, 1, D]; key, value: [B, KVH, T, D] (see `usable`); key_mask: [B, T] bool (True:
    the key may be attended) or None -> [B, H, 1, D] in query's dtype. Head h reads KV head
    h // (H / KVH), as transformers' repeat_kv lays them out. All keys masked: zeros."""
    B, H, _, D = query.shape
    q = query.reshape(B, H, D).to(torch.float32).contiguous()
    m = torch.empty(0, dtype=torch.bool) if key_mask is None else key_mask.to(torch.bool).contiguous()
    out = load().dense_decode(q, key, value, m, float(scaling), int(chunk))
    return out.view(B, H, 1, D).to(query.dtype)
