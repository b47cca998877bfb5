"""The offloaded Double Sparsity cache layer: full K/V in a slow tier, labels and a few tokens near compute.

Per layer, on the compute device: the label cache [B, KVH, T, r] (dense layers have none), the
first `sink` tokens' K/V and a tail of the latest tokens (`keep` .. `keep + flush` of them). In the
slow tier (`accel.offload.store`): every token older than the tail, token-major, K and V in one row.
New tokens join the tail; once the tail passes `keep + flush` tokens its oldest ones move down in
one write (`settle`). Selected tokens are fetched with one `index_select` per layer (`fetch`).

A session (`OffloadSession`, one per transformers Cache) owns the stores' directory, the fetch
buffers and the counters; after an error it is marked broken and refuses further use, because a
forward stopped half-way leaves its layers at different lengths.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import torch

from accel.kernels.ds_attention import gather_labels
from accel.offload.store import DiskStore, HostStore, OffloadError

from .compat import CacheLayerMixin
from .ds_cache import dequantize_labels, quantize_labels


def to_rows(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k, v: [B, KVH, n, D] -> [n, B * KVH, 2 * D] (the slow tier's row layout)."""
    B, KVH, n, D = k.shape
    return torch.cat([k, v], -1).permute(2, 0, 1, 3).reshape(n, B * KVH, 2 * D)


def from_rows(x: torch.Tensor, B: int, KVH: int) -> torch.Tensor:
    """[n, B * KVH, 2 * D] -> [B, KVH, n, 2 * D]."""
    return x.view(x.shape[0], B, KVH, x.shape[-1]).permute(1, 2, 0, 3)


class _Grow:
    """A tensor [B, KVH, n, c] growing along dim 2 in chunks of `chunk` tokens."""

    def __init__(self, chunk: int = 1024):
        self.buf, self.n, self.chunk = None, 0, chunk

    def append(self, x: torch.Tensor) -> None:
        need = self.n + x.shape[2]
        if self.buf is None or need > self.buf.shape[2]:
            cap = -(-need // self.chunk) * self.chunk
            new = x.new_empty(*x.shape[:2], cap, x.shape[3])
            if self.buf is not None:
                new[:, :, : self.n] = self.buf[:, :, : self.n]
            self.buf = new
        self.buf[:, :, self.n: need] = x
        self.n = need

    def view(self, extra: int = 0) -> torch.Tensor:
        """The first n (+ `extra` zeroed slots past the end) tokens."""
        if extra:
            if self.n + extra > self.buf.shape[2]:
                self.append(self.buf.new_zeros(*self.buf.shape[:2], extra, self.buf.shape[3]))
                self.n -= extra
            self.buf[:, :, self.n: self.n + extra] = 0
        return self.buf[:, :, : self.n + extra]

    @property
    def nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()


class OffloadSession:
    """Slow-tier resources of one transformers Cache: the directory (disk), buffers and counters."""

    def __init__(self, kind: str, directory: str | None = None, chunk_tokens: int = 1024, prefetcher=None):
        self.kind, self.chunk_tokens, self.prefetcher = kind, chunk_tokens, prefetcher
        self.broken: str | None = None
        self.layers: dict[int, "OffloadedDSLayer"] = {}
        self.hits = self.hit_total = 0
        self.decode_tokens, self.decode_start = 0, 0  # decode steps; bytes moved before the first
        self.buffer_bytes = 0  # the largest assembled selection buffer seen (K+V of the selected tokens)
        self.dir = None
        if kind == "disk":
            base = directory or tempfile.gettempdir()
            try:
                os.makedirs(base, exist_ok=True)
                self.dir = tempfile.mkdtemp(prefix="accel-ds-offload-", dir=base)
            except OSError as e:
                raise OffloadError(f"offload_dir {base!r} is not usable: {e.strerror or e}") from e
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, True)

    def check(self) -> None:
        if self.broken is not None:
            raise OffloadError(f"this offloaded cache is unusable after an earlier error ({self.broken}); "
                               "start a new generation with a fresh cache")

    def fail(self, e: Exception) -> None:
        self.broken = str(e)

    def new_store(self, layer_idx: int, rows_per_token: int, row_elems: int, dtype: torch.dtype, pin: bool):
        if self.kind == "disk":
            return DiskStore(self.dir, f"layer{layer_idx:03d}.kv", rows_per_token, row_elems, dtype,
                             self.chunk_tokens)
        return HostStore(rows_per_token, row_elems, dtype, self.chunk_tokens, pin=pin)

    def close(self) -> None:
        for layer in self.layers.values():
            if layer.store is not None:
                layer.store.close()
        if self.dir is not None:
            self._finalizer()


class OffloadedDSLayer(CacheLayerMixin):
    """One layer's offloaded cache. channels: [KVH, r] int64, or None for a dense layer (no labels;
    `update` then returns every token's K/V, read back from the slow tier)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, session: OffloadSession, layer_idx: int, channels: torch.Tensor | None = None,
                 bits: int = 16, sink: int = 4, keep: int = 32, flush: int = 64):
        super().__init__()
        self.session, self.layer_idx, self.channels, self.bits = session, layer_idx, channels, bits
        self.sink, self.keep, self.flush = sink, max(keep, 1), max(flush, 1)
        self.length = self.n_slow = 0
        self.store = None
        self.sink_kv: torch.Tensor | None = None  # [B, KVH, <=sink, 2D], also in the slow tier
        self.label_parts: list[_Grow] = []
        self.pending = None  # a predicted selection for the next decode step (see fetch_plan)
        session.layers[layer_idx] = self

    # ---- transformers' layer interface ----------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.B, self.KVH, _, self.D = key_states.shape
        pin = self.session.kind == "cpu" and key_states.device.type == "cuda"
        self.store = self.session.new_store(self.layer_idx, self.B * self.KVH, 2 * self.D, self.dtype, pin)
        self.keys = key_states.new_empty(self.B, self.KVH, 0, self.D)
        self.values = value_states.new_empty(self.B, self.KVH, 0, self.D)
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def update(self, key_states, value_states, *args, **kwargs):
        """Append; returns all K/V for a multi-token step or a dense layer, else the device tail
        (a sparse decode step is served by the offload attention handler through `fetch`)."""
        self.session.check()
        s = self.session
        if key_states.shape[2] == 1 and self.layer_idx == min(s.layers):
            if s.decode_tokens == 0:
                s.decode_start = sum(l.store.bytes_read + l.store.bytes_written
                                     for l in s.layers.values() if l.store is not None)
            s.decode_tokens += 1
        self.extend(key_states, value_states, settle=False)
        if self.channels is None:
            k, v = self.read_all()
            self._settle_or_fail()
            return k, v
        if key_states.shape[2] > 1:
            return self.read_all()
        return self.keys, self.values

    def extend(self, key_states: torch.Tensor, value_states: torch.Tensor, settle: bool = True) -> None:
        """Append K/V [B, KVH, n, D] (labels too); with settle, move old tail tokens down now."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.channels is not None:
            lab = gather_labels(key_states, self.channels.to(key_states.device))
            parts = (lab,) if self.bits >= 16 else quantize_labels(lab, self.bits)
            if not self.label_parts:
                self.label_parts = [_Grow() for _ in parts]
            for g, p in zip(self.label_parts, parts):
                g.append(p)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.length += key_states.shape[2]
        if settle:
            self._settle_or_fail()

    def _settle_or_fail(self) -> None:
        try:
            self.settle()
        except OffloadError as e:
            self.session.fail(e)
            raise

    def settle(self) -> None:
        """Move the tail's tokens older than the last `keep` to the slow tier, once there are
        more than `flush` of them (writes in chunks, not one token at a time)."""
        n_tail = self.keys.shape[2]
        move = n_tail - self.keep
        if move < self.flush:
            return
        k, v = self.keys[:, :, :move], self.values[:, :, :move]
        # Written first, state changed after: a failed write leaves this layer as it was.
        self.store.append(to_rows(k, v))
        if self.n_slow < self.sink:
            head = torch.cat([k, v], -1)[:, :, : self.sink - self.n_slow]
            self.sink_kv = head.clone() if self.sink_kv is None else torch.cat([self.sink_kv, head], 2)
        self.n_slow += move
        self.keys = self.keys[:, :, move:].clone()
        self.values = self.values[:, :, move:].clone()

    def reset(self) -> None:
        if self.store is not None:
            self.store.close()
        self.__init__(self.session, self.layer_idx, self.channels, self.bits, self.sink, self.keep, self.flush)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the offloaded Double Sparsity cache cannot be cropped (no assisted decoding)")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("the offloaded Double Sparsity cache does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the offloaded Double Sparsity cache cannot be batch-expanded after filling")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("the offloaded Double Sparsity cache cannot drop batch rows")

    def offload(self):  # transformers' own layer offloading: this layer already is offloaded
        pass

    def prefetch(self):
        pass

    # ---- reads ----------------------------------------------------------------------------------
    def labels(self, dtype: torch.dtype, extra: int = 0) -> torch.Tensor:
        """[B, KVH, T (+ extra zero rows), r] in `dtype`."""
        parts = [g.view(extra) for g in self.label_parts]
        if self.bits >= 16:
            return parts[0].to(dtype)
        return dequantize_labels(*parts, self.bits, dtype)

    def read_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's K and V [B, KVH, T, D] on the compute device (a transient copy)."""
        if self.n_slow == 0:
            return self.keys, self.values
        try:
            old = from_rows(self.store.read(0, self.n_slow), self.B, self.KVH).to(self.device)
        except OffloadError as e:
            self.session.fail(e)
            raise
        return (torch.cat([old[..., : self.D], self.keys], 2), torch.cat([old[..., self.D:], self.values], 2))

    def fetch_plan(self, idx: torch.Tensor, key_mask: torch.Tensor | None) -> dict:
        """Split a selection idx [B, KVH, n] into device-resident and slow-tier tokens and start the
        slow-tier copy (on CUDA, on the prefetcher's side stream). Valid until the next `settle`."""
        idx = idx.sort(-1).values
        B, KVH, n = idx.shape
        in_slow = (idx >= self.n_sink_dev()) & (idx < self.n_slow)
        t = idx[in_slow].cpu()
        bh = torch.arange(B * KVH).view(B, KVH, 1).expand(B, KVH, n)[in_slow.cpu()]
        rows, perm = (t * (B * KVH) + bh).sort()
        ok = (torch.ones_like(idx, dtype=torch.bool) if key_mask is None
              else key_mask.bool()[:, None, :].expand(B, KVH, -1).gather(2, idx.clamp_max(key_mask.shape[1] - 1)))
        plan = {"idx": idx, "in_slow": in_slow, "perm": perm, "ok": ok, "m": rows.numel()}
        try:
            if self.session.prefetcher is not None:
                plan["handle"] = self.session.prefetcher.submit(self.store, rows)
            else:
                plan["rows"] = self.store.gather(rows)
        except OffloadError as e:
            self.session.fail(e)
            raise
        return plan

    def n_sink_dev(self) -> int:
        return 0 if self.sink_kv is None else self.sink_kv.shape[2]

    def assemble(self, plan: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (k, v [B, KVH, n, D] of the selected tokens in position order, ok [B, KVH, n] bool)."""
        idx, in_slow = plan["idx"], plan["in_slow"]
        pf = self.session.prefetcher
        fetched = pf.take(plan["handle"]) if pf is not None else plan["rows"].to(self.device)
        ns = self.n_sink_dev()
        dev = torch.cat([self.keys, self.values], -1)
        if ns:
            dev = torch.cat([self.sink_kv, dev], 2)
        # Position -> index into [sink | tail]; slow-tier entries point anywhere and are overwritten.
        didx = torch.where(idx < ns, idx, idx - self.n_slow + ns).clamp(0, dev.shape[2] - 1)
        out = dev.gather(2, didx[..., None].expand(*idx.shape, 2 * self.D))
        if plan["m"]:
            unsorted = torch.empty_like(fetched)
            unsorted[plan["perm"].to(fetched.device)] = fetched
            out[in_slow] = unsorted
        if pf is not None:
            pf.release(plan["handle"])
        self.session.buffer_bytes = max(self.session.buffer_bytes, out.numel() * out.element_size())
        return out[..., : self.D], out[..., self.D:], plan["ok"]

    # ---- accounting -----------------------------------------------------------------------------
    def device_bytes(self) -> int:
        t = sum(g.nbytes for g in self.label_parts)
        for x in (self.keys, self.values, self.sink_kv):
            if x is not None:
                t += x.numel() * x.element_size()
        return t

    def dense_bytes(self) -> int:
        return 0 if not self.is_initialized else 2 * self.B * self.KVH * self.length * self.D * \
            torch.empty((), dtype=self.dtype).element_size()
