"""Slow tiers for offloaded KV caches (host memory, memory-mapped files) and the CUDA prefetcher.

Method-agnostic storage: which tier a method uses is its config's business (e.g.
`DoubleSparsityConfig.offload`, validated there)."""
from .store import DiskStore, HostStore, OffloadError

__all__ = ["DiskStore", "HostStore", "OffloadError"]
