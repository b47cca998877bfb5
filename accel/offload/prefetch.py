"""Double-buffered host-to-GPU copies of slow-tier rows on a side CUDA stream.

Two slots. `submit` gathers the selected rows into slot s's pinned staging buffer (a CPU copy)
and queues its copy to slot s's GPU buffer on the side stream; `take` makes the compute stream
wait for that copy; `release` records when the compute stream is done reading the slot, and the
next `submit` into the same slot waits for it on the side stream. With prediction, layer i+1's
rows are submitted while layer i computes, so the copy overlaps with compute.

Ordering rules (why each wait is there):
- staging[s] is rewritten on the CPU only after its previous H2D copy finished (`copied[s]`);
- gpu[s] is overwritten on the side stream only after the compute stream released it;
- gpu[s] is allocated on the side stream and marked used by the compute stream (`record_stream`
  in `take`), so the caching allocator never reuses its memory while either stream may touch it.
"""
from __future__ import annotations

import torch


class CudaPrefetcher:
    def __init__(self, device: torch.device):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CudaPrefetcher needs a CUDA device, got {device}")
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.staging: list[torch.Tensor | None] = [None, None]
        self.gpu: list[torch.Tensor | None] = [None, None]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.released: list[torch.cuda.Event | None] = [None, None]
        self.next_slot = 0
        self.nbytes = 0

    def _ensure(self, s: int, m: int, row_elems: int, dtype: torch.dtype) -> None:
        buf = self.staging[s]
        if buf is not None and buf.shape[0] >= m and buf.shape[1] == row_elems and buf.dtype == dtype:
            return
        cap = max(m, 1) + max(m, 1) // 4
        self.staging[s] = torch.empty(cap, row_elems, dtype=dtype, pin_memory=True)
        with torch.cuda.stream(self.stream):
            self.gpu[s] = torch.empty(cap, row_elems, dtype=dtype, device=self.device)
        self.nbytes = sum(g.numel() * g.element_size() for g in self.gpu if g is not None)

    def submit(self, store, rows: torch.Tensor) -> tuple[int, int]:
        """rows: [m] int64 CPU, sorted -> a handle for `take`."""
        s = self.next_slot
        self.next_slot ^= 1
        m = rows.numel()
        if self.copied[s] is not None:
            self.copied[s].synchronize()
        self._ensure(s, m, store.row_elems, store.dtype)
        store.gather(rows, out=self.staging[s][:m])
        with torch.cuda.stream(self.stream):
            if self.released[s] is not None:
                self.stream.wait_event(self.released[s])
            self.gpu[s][:m].copy_(self.staging[s][:m], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.copied[s] = ev
        return s, m

    def take(self, handle: tuple[int, int]) -> torch.Tensor:
        """The rows of `handle` on the GPU, [m, row_elems], safe to read on the current stream."""
        s, m = handle
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(self.copied[s])
        self.gpu[s].record_stream(cur)
        return self.gpu[s][:m]

    def release(self, handle: tuple[int, int]) -> None:
        s, _ = handle
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.released[s] = ev
