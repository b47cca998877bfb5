"""Config of Double Sparsity (token sparsity chosen by a few calibrated key channels)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .base import ConfigError, MethodConfig, register_config

CHANNEL_TYPES = ("q", "k", "qk")
GROUP_REDUCES = ("max", "sum")
SCORE_MODES = ("sparse", "dense")
OFFLOAD_KINDS = (None, "cpu", "disk")
OFFLOAD_SELECTS = ("exact", "predicted")


@register_config
@dataclass
class DoubleSparsityConfig(MethodConfig):
    """Double Sparsity runtime settings.

    budget: tokens attended per decode step (sink + recent + top-k). A value in (0, 1] is a
        fraction of the context; a value > 1 is a whole number of tokens.
    heavy_channels: r, the label channels per KV head; None = head_dim // channel_divisor.
        Calibration stores the resolved r in the artifact.
    channel_divisor: r = head_dim // channel_divisor when heavy_channels is None (default 4:
        passkey at 1/16 on three models, eval/results/ds_passkey_defaults.json; version-1
        artifacts, from when the default was head_dim / 8, load with 8).
    channel_type: which calibration statistic ranks the channels ("q", "k" or "qk").
    sink / recent: first / last tokens always attended (counted inside the budget).
    group_reduce: how the query heads of a GQA group combine approximate scores.
    n_dense: the first n_dense layers stay dense (their attention is the least sparse).
    min_context: decode steps with fewer cached tokens than this stay dense. 8192 because the
        ds-kernels benchmark measured no gain below it on SmolLM2's shapes (0.93x end to end at
        4K, 0.9-1.4x attention at 8K); evaluation-mode forwards ignore it. Set it with
        `accel calibrate double-sparsity --min-context N` (stored in the artifact) or by replacing
        the artifact's config; 0 makes every decode step sparse.
    label_bits: 16 keeps labels in the KV dtype; 8 or 4 stores them min-max quantized. Default 8:
        r = d/4 at 8 bits costs the label bytes of d/8 at 16 bits (plus a 4-byte scale) and
        retrieves far better (version-1 artifacts keep the 16 they stored).
    score_mode: what a forward without a KV cache (perplexity / lm-eval scoring) does with its
        query rows: "sparse" applies the decode selection causally to every row, "dense" does not.
    offload: keep the full K/V in a slow tier: "cpu" (pinned host memory, for a CUDA model) or
        "disk" (memory-mapped files under `offload_dir`, default the temp dir); None = off.
    offload_select: "exact" (select with the layer's own query) or "predicted" (layer i-1's hidden
        state through this layer's q projection, so the fetch can start a layer early).
    """

    method: ClassVar[str] = "double-sparsity"
    # 2: default r from head_dim / 8 to head_dim / 4 (channel_divisor) and label_bits 16 -> 8.
    version: ClassVar[int] = 2

    budget: float = 1 / 16
    heavy_channels: int | None = None
    channel_divisor: int = 4
    channel_type: str = "qk"
    sink: int = 4
    recent: int = 32
    group_reduce: str = "max"
    n_dense: int = 2
    min_context: int = 8192
    label_bits: int = 8
    score_mode: str = "sparse"
    # Double Sparsity-Offload (accel.offload, patches/ds_offload.py): None | "cpu" | "disk".
    offload: str | None = None
    offload_dir: str | None = None
    offload_select: str = "exact"

    @classmethod
    def upgrade_params(cls, version, params):
        # Version 1 meant r = head_dim / 8 when heavy_channels was None, and 16-bit labels when
        # its params predate label_bits: pin both, so an old artifact keeps what it meant.
        if version == 1:
            return {"label_bits": 16, **params, "channel_divisor": 8}
        return super().upgrade_params(version, params)

    def validate(self) -> None:
        b = self.budget
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not math.isfinite(b) or b <= 0:
            raise ConfigError(f"double-sparsity: budget must be > 0 (a fraction in (0, 1] or a token count), got {b!r}")
        if b > 1 and b != int(b):
            raise ConfigError(f"double-sparsity: a budget above 1 is a token count and must be whole, got {b!r}")
        if self.heavy_channels is not None and (not isinstance(self.heavy_channels, int) or self.heavy_channels < 1):
            raise ConfigError(f"double-sparsity: heavy_channels must be a positive int, got {self.heavy_channels!r}")
        if self.channel_type not in CHANNEL_TYPES:
            raise ConfigError(f"double-sparsity: channel_type must be one of {CHANNEL_TYPES}, got {self.channel_type!r}")
        if self.group_reduce not in GROUP_REDUCES:
            raise ConfigError(f"double-sparsity: group_reduce must be one of {GROUP_REDUCES}, got {self.group_reduce!r}")
        if self.score_mode not in SCORE_MODES:
            raise ConfigError(f"double-sparsity: score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}")
        if isinstance(self.channel_divisor, bool) or self.channel_divisor < 1:
            raise ConfigError(f"double-sparsity: channel_divisor must be an int >= 1, got {self.channel_divisor!r}")
        for name in ("sink", "recent", "n_dense", "min_context"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"double-sparsity: {name} must be an int >= 0, got {v!r}")
        self.validate_offload()
        if self.label_bits not in (4, 8, 16):
            raise ConfigError(f"double-sparsity: label_bits must be 4, 8 or 16, got {self.label_bits!r}")
        if self.label_bits == 4 and self.heavy_channels is not None and self.heavy_channels % 2:
            raise ConfigError(f"double-sparsity: 4-bit labels pack two channels a byte; heavy_channels must be even, "
                              f"got {self.heavy_channels}")

    def validate_offload(self) -> None:
        """The `offload`, `offload_dir` and `offload_select` fields (raises ConfigError)."""
        if self.offload not in OFFLOAD_KINDS:
            raise ConfigError(f"{self.method}: offload must be None, 'cpu' or 'disk', got {self.offload!r}")
        if self.offload_select not in OFFLOAD_SELECTS:
            raise ConfigError(f"{self.method}: offload_select must be one of {OFFLOAD_SELECTS}, "
                              f"got {self.offload_select!r}")
        if self.offload_dir is not None and not isinstance(self.offload_dir, str):
            raise ConfigError(f"{self.method}: offload_dir must be a path string, got {self.offload_dir!r}")
        if self.offload_dir is not None and self.offload != "disk":
            raise ConfigError(f"{self.method}: offload_dir is only used with offload='disk' "
                              f"(offload={self.offload!r})")

    def channels_for(self, head_dim: int) -> int:
        """r for a model with `head_dim`; raises ConfigError when r does not fit."""
        r = self.heavy_channels if self.heavy_channels is not None else max(1, head_dim // self.channel_divisor)
        if r > head_dim:
            raise ConfigError(f"double-sparsity: heavy_channels={r} exceeds the model's head_dim={head_dim}")
        if self.label_bits == 4 and r % 2:
            raise ConfigError(f"double-sparsity: 4-bit labels pack two channels a byte; r = {r} (head_dim={head_dim}, "
                              f"channel_divisor={self.channel_divisor}) must be even; set heavy_channels")
        return r

    def budget_tokens(self, context: int) -> int:
        """The number of tokens attended for a context of `context` tokens (at least 1)."""
        if self.budget <= 1:
            return max(1, math.ceil(self.budget * context))
        return int(self.budget)
