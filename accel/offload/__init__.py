"""Slow tiers for offloaded KV caches (host memory, memory-mapped files) and the CUDA prefetcher."""
from .store import DiskStore, HostStore, OffloadError

OFFLOAD_KINDS = (None, "cpu", "disk")
OFFLOAD_SELECTS = ("exact", "predicted")


def validate_offload(cfg) -> None:
    """Check a config's `offload`, `offload_dir` and `offload_select` fields (raises ConfigError)."""
    from accel.configs.base import ConfigError
    if cfg.offload not in OFFLOAD_KINDS:
        raise ConfigError(f"{cfg.method}: offload must be None, 'cpu' or 'disk', got {cfg.offload!r}")
    if cfg.offload_select not in OFFLOAD_SELECTS:
        raise ConfigError(f"{cfg.method}: offload_select must be one of {OFFLOAD_SELECTS}, got {cfg.offload_select!r}")
    if cfg.offload_dir is not None and not isinstance(cfg.offload_dir, str):
        raise ConfigError(f"{cfg.method}: offload_dir must be a path string, got {cfg.offload_dir!r}")
    if cfg.offload_dir is not None and cfg.offload != "disk":
        raise ConfigError(f"{cfg.method}: offload_dir is only used with offload='disk' (offload={cfg.offload!r})")


__all__ = ["DiskStore", "HostStore", "OFFLOAD_KINDS", "OFFLOAD_SELECTS", "OffloadError", "validate_offload"]
