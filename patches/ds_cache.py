"""The Double Sparsity label cache: a transformers cache layer that keeps, next to K and V, the
r heavy channels of every cached key (post-RoPE), `[B, KVH, T, r]`.

`DSLabelLayer` extends `DynamicLayer`, so every operation transformers applies to a cache
(update in generate(), crop, beam reorder, batch repeat/select, reset) also applies to the
labels. Labels may be stored min-max quantized to 8 or 4 bits (per token and KV head, over its
r channels), as in the paper; `label_bytes()` counts what is stored.

`DSStaticLabelLayer` is the same for transformers' `StaticLayer` (`cache_implementation="static"`,
what a compiled decode step needs): preallocated `[B, KVH, max_cache_len, r]` labels written in
place at the positions the keys are written (`accel::ds_update_labels`), so shapes never change.
A press upgrades the plain layer it meets on first use (prefill), as it does a `DynamicLayer`.

`GrowingLayer` is a `DynamicLayer` whose K/V live in buffers with headroom (1/8 of the length,
at least 256 tokens): a decode step writes its token in place and hands out prefix views, where
`DynamicLayer` concatenates the whole cache every step (at 8K tokens on SmolLM2, ~190 MB copied
per token). `DSLabelLayer` grows the same way, labels included. Everything transformers does to
a layer still works: its crop leaves prefix views of the buffer (kept, no copy); reorder, batch
ops and offload assign fresh tensors, which the next update copies into a new buffer. Under
autograd or torch.compile the layer concatenates as `DynamicLayer` does.
"""
from __future__ import annotations

import torch

from accel.kernels.ds_attention import (QuantizedLabels, dequantize_codes, ds_update_labels, gather_labels,
                                        native_label_codes)

from .compat import DynamicLayer, StaticLayer, is_compiling, mark_static_address


def quantize_labels(x: torch.Tensor, bits: int):
    """x: [..., r] -> (codes uint8 [..., r] (8-bit) or [..., r/2] (4-bit, two per byte),
    scale [..., 1] fp16, low [..., 1] fp16). Asymmetric min-max over the last dim."""
    lo = x.amin(-1, keepdim=True).float()
    hi = x.amax(-1, keepdim=True).float()
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    codes = ((x.float() - lo) / scale).round_().clamp_(0, qmax).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale.half(), lo.half()


def dequantize_labels(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """The inverse of quantize_labels, in `dtype` (the formula lives with the kernels, which score
    quantized labels without this copy: accel.kernels.ds_attention.QuantizedLabels)."""
    return dequantize_codes(codes, scale, low, bits, dtype)


def fake_quantize_labels(x: torch.Tensor, bits: int) -> torch.Tensor:
    """What a label looks like after a round trip through `bits`-bit storage (16 = unchanged)."""
    if bits >= 16:
        return x
    return dequantize_labels(*quantize_labels(x, bits), bits, x.dtype)


def label_parts(keys: torch.Tensor, channels: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """What a label cache stores for keys [B, KVH, n, D]: (labels,) at 16 bits, else
    quantize_labels' (codes, scale, low), by one native pass on the CPU (bit-exact; the torch ops
    cost ~12 small calls per layer per decode step, and 3-5% of an 8K prefill)."""
    if bits >= 16:
        return (gather_labels(keys, channels),)
    parts = native_label_codes(keys, channels, bits)
    return parts if parts is not None else quantize_labels(gather_labels(keys, channels), bits)


def _labels(parts, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The label cache's stored parts as labels in `dtype` (dequantized when stored in < 16 bits)."""
    if parts is None:
        raise RuntimeError("the label cache is empty")
    if bits >= 16:
        return parts[0].to(dtype)
    return dequantize_labels(*parts, bits, dtype)

# Headroom of a grown buffer: 1/8 of the tokens it must hold (so a regrow, which copies the cache,
# comes once per n/8 steps: ~8 rows copied per step on average), and at least MIN_HEADROOM tokens.
MIN_HEADROOM = 256
HEADROOM_DIV = 8


def _is_prefix_of(cur: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether cur is buf[..., :n, :] for some n (a view this layer handed out, or a crop of one)."""
    return (cur.dim() == buf.dim() and cur.data_ptr() == buf.data_ptr() and cur.stride() == buf.stride()
            and cur.shape[:-2] == buf.shape[:-2] and cur.shape[-1] == buf.shape[-1]
            and cur.shape[-2] <= buf.shape[-2] and cur.dtype == buf.dtype and cur.device == buf.device)


def grow_append(buf: torch.Tensor | None, cur: torch.Tensor | None, x: torch.Tensor):
    """`cat([cur, x], dim=-2)` as (buffer, prefix view of it), written in place when `cur` is a prefix
    view of `buf` with room for x; otherwise copied into a new buffer with headroom.

    cur: [..., n, c] (None or empty: nothing cached); x: [..., m, c]. Returns (buf, view [..., n+m, c])."""
    n = 0 if cur is None or cur.numel() == 0 else cur.shape[-2]
    need = n + x.shape[-2]
    fits = (buf is not None and (n == 0 or _is_prefix_of(cur, buf)) and need <= buf.shape[-2]
            and buf.shape[:-2] == x.shape[:-2] and buf.shape[-1] == x.shape[-1] and buf.dtype == x.dtype
            and buf.device == x.device
            # An inference tensor cannot be written outside inference_mode (a cache filled under it).
            and not (buf.is_inference() and not torch.is_inference_mode_enabled()))
    if not fits:
        cap = need + max(MIN_HEADROOM, need // HEADROOM_DIV)
        new = x.new_empty(*x.shape[:-2], cap, x.shape[-1])
        if n:
            new.narrow(-2, 0, n).copy_(cur)
        buf = new
    # narrow, not buf[..., a:b, :]: the same views, without parsing an index tuple (5 calls a layer a step).
    buf.narrow(-2, n, need - n).copy_(x)
    return buf, buf.narrow(-2, 0, need)


def _concatenates(*xs: torch.Tensor) -> bool:
    """Whether an update must concatenate as DynamicLayer does: a graph being traced, or autograd
    recording (in-place writes into a buffer whose earlier views autograd saved would fail)."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(x.requires_grad for x in xs))


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends in place (see the module docstring). keys/values are prefix
    views [B, KVH, T, D] of buffers [B, KVH, capacity, D]."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    @classmethod
    def from_layer(cls, layer: DynamicLayer, *args, **kwargs):
        """Take over a plain DynamicLayer's K/V (no copy; the next update copies them into buffers)."""
        new = cls(*args, **kwargs)
        for attr in ("keys", "values", "is_initialized", "dtype", "device"):
            if hasattr(layer, attr):
                setattr(new, attr, getattr(layer, attr))
        return new

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if _concatenates(key_states, value_states, self.keys, self.values):
            return super().update(key_states, value_states, *args, **kwargs)
        self._kbuf, self.keys = grow_append(self._kbuf, self.keys, key_states)
        self._vbuf, self.values = grow_append(self._vbuf, self.values, value_states)
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._kbuf = self._vbuf = None

    def capacity(self) -> int:
        """Tokens the K buffer holds before it must grow (0 before the first in-place update)."""
        return 0 if self._kbuf is None else self._kbuf.shape[-2]


class DSLabelLayer(GrowingLayer):
    """A DynamicLayer whose keys carry a label cache. `channels`: [KVH, r] int64."""

    def __init__(self, channels: torch.Tensor, bits: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.bits = bits
        # bits == 16: one tensor [B, KVH, T, r]; otherwise (codes, scale, low), all with T at dim -2.
        self.label_parts: tuple[torch.Tensor, ...] | None = None
        self._label_bufs: tuple[torch.Tensor | None, ...] | None = None

    @classmethod
    def from_layer(cls, layer: DynamicLayer, channels: torch.Tensor, bits: int = 16) -> "DSLabelLayer":
        """Take over a plain DynamicLayer's K/V (no copy) and label what it already holds."""
        new = super().from_layer(layer, channels, bits)
        if new.get_seq_length() > 0:
            new.label_parts = new._make_parts(new.keys)
        return new

    def _make_parts(self, keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return label_parts(keys, self.channels, self.bits)

    def _map(self, fn) -> None:
        if self.label_parts is not None:
            self.label_parts = tuple(fn(p) for p in self.label_parts)

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        new = self._make_parts(key_states)
        if self._label_bufs is None:
            self._label_bufs = (None,) * len(new)
        if _concatenates(key_states):
            if self.label_parts is None:
                self.label_parts = new
            else:
                self.label_parts = tuple(torch.cat([a, b], dim=-2) for a, b in zip(self.label_parts, new))
            return keys, values
        cur = self.label_parts or (None,) * len(new)
        grown = [grow_append(b, c, x) for b, c, x in zip(self._label_bufs, cur, new)]
        self._label_bufs = tuple(b for b, _ in grown)
        self.label_parts = tuple(v for _, v in grown)
        return keys, values

    def labels(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[B, KVH, T, r] in `dtype` (default: the keys' dtype), dequantized if stored quantized."""
        return _labels(self.label_parts, self.bits, dtype or self.keys.dtype)

    def stored_labels(self, dtype: torch.dtype | None = None):
        """The labels as stored, for the decode op: [B, KVH, T, r] at 16 bits (in `dtype`), else a
        `QuantizedLabels` view of the codes (its `dequantize()` is `labels(dtype)`)."""
        if self.bits >= 16 or self.label_parts is None:
            return self.labels(dtype)
        return QuantizedLabels(*self.label_parts, self.bits, dtype or self.keys.dtype)

    def label_length(self) -> int:
        return 0 if self.label_parts is None else self.label_parts[0].shape[-2]

    def label_bytes(self) -> int:
        if self.label_parts is None:
            return 0
        return sum(p.numel() * p.element_size() for p in self.label_parts)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.label_parts is not None:
            self._map(lambda p: p[..., :tokens_to_remove, :])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.label_parts is not None:
            self._map(lambda p: p.index_select(0, beam_idx.to(p.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map(lambda p: p.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map(lambda p: p[indices, ...])

    def reset(self) -> None:
        super().reset()
        self.label_parts = self._label_bufs = None

    def offload(self):
        super().offload()
        self._map(lambda p: p.to("cpu", non_blocking=True))

    def prefetch(self):
        super().prefetch()
        if self.is_initialized:
            self._map(lambda p: p.to(self.keys.device, non_blocking=True))


class DSStaticLabelLayer(StaticLayer):
    """A StaticLayer whose keys carry a preallocated label cache. `channels`: [KVH, r] int64.

    label_parts: (labels [B, KVH, max_cache_len, r],) at 16 bits, or (codes, scale, low) with the
    token dim at -2; positions past `cumulative_length` hold stale or zero labels, never read (the
    decode op reads only the filled prefix)."""

    def __init__(self, max_cache_len: int, channels: torch.Tensor, bits: int = 16, **kwargs):
        super().__init__(max_cache_len, **kwargs)
        self.channels = channels
        self.bits = bits
        self.label_parts: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def from_layer(cls, layer: StaticLayer, channels: torch.Tensor, bits: int = 16) -> "DSStaticLabelLayer":
        """Take over a plain StaticLayer's buffers (no copy) and label what it already holds."""
        new = cls(layer.max_cache_len, channels, bits)
        new.__dict__.update({k: v for k, v in layer.__dict__.items() if k not in ("channels", "bits", "label_parts")})
        if new.is_initialized:
            new._alloc_labels()
        return new

    def _alloc_labels(self) -> None:
        parts = self._parts_of(self.keys)
        self.label_parts = tuple(p.contiguous() for p in parts)
        if not is_compiling():
            for p in self.label_parts:
                mark_static_address(p)

    def _parts_of(self, keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return label_parts(keys, self.channels.to(keys.device), self.bits)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._alloc_labels()

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # The positions StaticLayer.update writes, read before it advances cumulative_length.
        pos = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.bits >= 16:
            ds_update_labels(self.label_parts[0], key_states, self.channels.to(key_states.device), pos)
        else:
            for part, new in zip(self.label_parts, self._parts_of(key_states)):
                part.index_copy_(part.dim() - 2, pos, new)
        return keys, values

    def labels(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[B, KVH, max_cache_len, r] in `dtype` (default: the keys' dtype); only the first
        `cumulative_length` tokens are meaningful."""
        return _labels(self.label_parts, self.bits, dtype or self.keys.dtype)

    def label_bytes(self) -> int:
        return 0 if self.label_parts is None else sum(p.numel() * p.element_size() for p in self.label_parts)

    def reset(self) -> None:
        super().reset()
        if self.label_parts is not None:
            for p in self.label_parts:
                p.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.label_parts is not None:
            # In place: a compiled decode step marked these buffers' addresses static (as the
            # key/value buffers); new tensors would make it recompile. index_select first, since
            # beams may read rows that the copy overwrites.
            for p in self.label_parts:
                p.copy_(p.index_select(0, beam_idx.to(p.device)))

