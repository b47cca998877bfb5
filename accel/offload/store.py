"""Slow tiers for an offloaded KV cache: host memory (`HostStore`) or memory-mapped files (`DiskStore`).

Both hold one layer's K and V token-major, so the file can grow at its end:

    rows: [capacity_tokens * B * KVH, 2 * D]   row (t, b, h) = t * B * KVH + b * KVH + h
                                              row[:D] = K[b, h, t], row[D:] = V[b, h, t]

K and V of a token share a row, so fetching the selected tokens of a layer is one `index_select`
(one batched copy). Tokens are only ever appended; a row never changes once written.

Disk: each store is one file under a directory, preallocated with `posix_fallocate` in chunks (a
full disk fails there, with ENOSPC, not later inside a memory-mapped read), written with `pwrite`
through `_write_at` (tests patch it to simulate ENOSPC) and read through `mmap`. A gather runs in
batches of `GATHER_BATCH` rows and `madvise(MADV_DONTNEED)`s each batch's byte range (plus the
kernel's 64 KiB fault-around window) right after, so the pages read never pile up in the
process's resident set (a scattered 1/16 gather over a whole mapping otherwise maps nearly all of
it); the file's bytes stay in the page cache, which the kernel may drop.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import weakref

import torch

from accel.errors import AccelError

log = logging.getLogger(__name__)
GATHER_BATCH = 512
# Linux maps up to fault_around_bytes (64 KiB) of cached file pages around each read fault.
_FAULT_AROUND = 64 << 10


class OffloadError(RuntimeError, AccelError):
    """The slow tier of an offloaded cache cannot be created, written or read."""


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (pwrite may write less than asked)."""
    while len(data):
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        data, offset = data[n:], offset + n


def _grow_tokens(have: int, need: int, chunk: int) -> int:
    # Geometric growth (x1.25) rounded up to whole chunks: few regrowths, little slack.
    target = max(need, have + have // 4)
    return -(-target // chunk) * chunk


class _Store:
    """Common bookkeeping. row_elems = 2 * D; rows_per_token = B * KVH."""

    def __init__(self, rows_per_token: int, row_elems: int, dtype: torch.dtype, chunk_tokens: int):
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.rows_per_token, self.row_elems, self.dtype = rows_per_token, row_elems, dtype
        self.chunk = chunk_tokens
        self.tokens = 0
        self.row_bytes = row_elems * torch.empty((), dtype=dtype).element_size()
        self.bytes_written = 0
        self.bytes_read = 0

    @property
    def nbytes(self) -> int:
        """Bytes of K/V held (tokens written)."""
        return self.tokens * self.rows_per_token * self.row_bytes

    def _check_rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.rows_per_token, self.row_elems) or x.dtype != self.dtype:
            raise ValueError(f"slow tier append expects [n, {self.rows_per_token}, {self.row_elems}] {self.dtype}, "
                             f"got {tuple(x.shape)} {x.dtype}")
        return x.detach().to("cpu").contiguous()


class HostStore(_Store):
    """K/V rows in host memory; `pin=True` page-locks them (for async copies to a CUDA device)."""

    kind = "cpu"

    def __init__(self, rows_per_token: int, row_elems: int, dtype: torch.dtype, chunk_tokens: int = 1024,
                 pin: bool = False):
        super().__init__(rows_per_token, row_elems, dtype, chunk_tokens)
        self.pin = pin
        self.buf = self._alloc(0)

    def _alloc(self, tokens: int) -> torch.Tensor:
        return torch.empty(tokens * self.rows_per_token, self.row_elems, dtype=self.dtype, pin_memory=self.pin)

    @property
    def capacity_bytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()

    def append(self, x: torch.Tensor) -> None:
        """x: [n, B * KVH, 2 * D] -> rows of tokens [tokens, tokens + n)."""
        x = self._check_rows(x)
        n = x.shape[0]
        need = self.tokens + n
        if need * self.rows_per_token > self.buf.shape[0]:
            new = self._alloc(_grow_tokens(self.buf.shape[0] // self.rows_per_token, need, self.chunk))
            new[: self.tokens * self.rows_per_token].copy_(self.buf[: self.tokens * self.rows_per_token])
            self.buf = new
        a = self.tokens * self.rows_per_token
        self.buf[a: a + n * self.rows_per_token].copy_(x.reshape(-1, self.row_elems))
        self.tokens = need
        self.bytes_written += x.numel() * x.element_size()

    def gather(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """rows: [m] int64 (sorted for locality) -> [m, 2 * D]."""
        got = torch.index_select(self.buf[: self.tokens * self.rows_per_token], 0, rows, out=out)
        self.bytes_read += rows.numel() * self.row_bytes
        return got

    def read(self, t0: int, t1: int) -> torch.Tensor:
        """Tokens [t0, t1) -> [t1 - t0, B * KVH, 2 * D] (a copy)."""
        r = self.rows_per_token
        self.bytes_read += (t1 - t0) * r * self.row_bytes
        return self.buf[t0 * r: t1 * r].view(t1 - t0, r, self.row_elems).clone()

    def close(self) -> None:
        self.buf = self._alloc(0)
        self.tokens = 0


def _close_disk(fd_box: list, mm_box: list, path: str) -> None:
    if mm_box[0] is not None:
        try:
            mm_box[0].close()
        except BufferError:  # a tensor still views it; the mapping goes when that tensor does
            pass
    if fd_box[0] is not None:
        os.close(fd_box[0])
        fd_box[0] = None
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class DiskStore(_Store):
    """K/V rows in a file under `directory` (created here, deleted on `close` or garbage collection)."""

    kind = "disk"

    def __init__(self, directory: str, name: str, rows_per_token: int, row_elems: int, dtype: torch.dtype,
                 chunk_tokens: int = 1024):
        super().__init__(rows_per_token, row_elems, dtype, chunk_tokens)
        self.path = os.path.join(directory, name)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise OffloadError(f"cannot create the offload file {self.path!r}: {e.strerror or e}") from e
        self._fd, self._mm = [fd], [None]
        self._mapped: torch.Tensor | None = None
        self.file_bytes = 0
        self._finalizer = weakref.finalize(self, _close_disk, self._fd, self._mm, self.path)

    @property
    def capacity_bytes(self) -> int:
        return self.file_bytes

    def _check_file(self) -> None:
        """Fail clearly (instead of a SIGBUS inside a mapped read) when the file went away or shrank."""
        if self._fd[0] is None:
            raise OffloadError(f"the offload file {self.path!r} is closed")
        st = os.fstat(self._fd[0])
        if st.st_nlink == 0 or not os.path.exists(self.path):
            raise OffloadError(f"the offload file {self.path!r} was removed while the cache was in use; "
                               "the cached K/V are lost, start a new generation")
        if st.st_size < self.file_bytes:
            raise OffloadError(f"the offload file {self.path!r} shrank to {st.st_size} bytes "
                               f"(expected {self.file_bytes}); the cached K/V are lost")

    def _remap(self) -> None:
        self._mapped = None
        if self._mm[0] is not None:
            try:
                self._mm[0].close()
            except BufferError:
                pass
        self._mm[0] = mmap.mmap(self._fd[0], self.file_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        raw = torch.frombuffer(self._mm[0], dtype=torch.uint8)
        self._mapped = raw.view(self.dtype).view(-1, self.row_elems)

    def _ensure(self, tokens: int) -> None:
        need = tokens * self.rows_per_token * self.row_bytes
        if need <= self.file_bytes:
            return
        new_tokens = _grow_tokens(self.file_bytes // (self.rows_per_token * self.row_bytes), tokens, self.chunk)
        new_bytes = new_tokens * self.rows_per_token * self.row_bytes
        try:
            os.posix_fallocate(self._fd[0], self.file_bytes, new_bytes - self.file_bytes)
        except OSError as e:
            raise OffloadError(f"cannot grow the offload file {self.path!r} to {new_bytes} bytes: "
                               f"{e.strerror or e} (is the disk full?)") from e
        self.file_bytes = new_bytes
        self._remap()

    def append(self, x: torch.Tensor) -> None:
        """x: [n, B * KVH, 2 * D] -> rows of tokens [tokens, tokens + n). On failure nothing counts as written."""
        x = self._check_rows(x)
        self._check_file()
        n = x.shape[0]
        self._ensure(self.tokens + n)
        offset = self.tokens * self.rows_per_token * self.row_bytes
        try:
            _write_at(self._fd[0], memoryview(x.view(torch.uint8).numpy()).cast("B"), offset)
        except OSError as e:
            raise OffloadError(f"cannot write {x.numel() * x.element_size()} bytes to the offload file "
                               f"{self.path!r}: {e.strerror or e}") from e
        self.tokens += n
        self.bytes_written += x.numel() * x.element_size()

    def gather(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """rows: [m] int64 (sorted for locality) -> [m, 2 * D] in memory."""
        self._check_file()
        if self.tokens == 0:
            return torch.empty(0, self.row_elems, dtype=self.dtype) if out is None else out[:0]
        src = self._mapped[: self.tokens * self.rows_per_token]
        m = rows.numel()
        if out is None:
            out = torch.empty(m, self.row_elems, dtype=self.dtype)
        page = mmap.PAGESIZE
        for a in range(0, m, GATHER_BATCH):
            r = rows[a: a + GATHER_BATCH]
            torch.index_select(src, 0, r, out=out[a: a + GATHER_BATCH])
            # Drop the pages just read from this process's resident set (they stay in the page cache).
            lo = max(0, int(r.min()) * self.row_bytes - _FAULT_AROUND) // page * page
            hi = min(self.file_bytes, (int(r.max()) + 1) * self.row_bytes + _FAULT_AROUND)
            self._mm[0].madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        self.bytes_read += m * self.row_bytes
        return out[:m]

    def read(self, t0: int, t1: int) -> torch.Tensor:
        """Tokens [t0, t1) -> [t1 - t0, B * KVH, 2 * D] (a copy)."""
        self._check_file()
        r = self.rows_per_token
        got = self._mapped[t0 * r: t1 * r].view(t1 - t0, r, self.row_elems).clone()
        self._mm[0].madvise(mmap.MADV_DONTNEED)
        self.bytes_read += (t1 - t0) * r * self.row_bytes
        return got

    def close(self) -> None:
        self._mapped = None
        self._finalizer()
        self.tokens = 0
