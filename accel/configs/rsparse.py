"""R-Sparse (rank-aware activation sparsity) and its TEAL-style baseline: config and budget split.

Per targeted linear `y = W x` (W: [out, in]) with layer sparsity `s` and sparse share `rho`:

    active channels  k = (1 - s) * rho * in           (on average; a scalar threshold per linear)
    low-rank rank    r = floor(in * out * (1 - s) * (1 - rho) / (in + out))

so that `k * out + r * (in + out) = in * out * (1 - s)`: the sparse path reads k weight columns
and the low-rank path reads U_r [out, r] and (Σ Vᵀ)_r [r, in]. Unlike the official code, `in` and
`out` are the linear's own shapes, so GQA k/v projections (out < in) get their right rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from .base import ConfigError, MethodConfig, register_config

MODES = ("rsparse", "teal")
SEARCHES = ("greedy", "evo", "uniform")


def check_sparsity(s: float, what: str = "sparsity") -> None:
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or not 0.0 <= s < 1.0:
        raise ConfigError(f"{what} must be a number in [0, 1), got {s!r}")


def active_fraction(s: float, rho: float) -> float:
    """Fraction of input channels routed through the sparse path."""
    return (1.0 - s) * rho


def rank_for(in_features: int, out_features: int, s: float, rho: float) -> int:
    """Rank of the low-rank path that spends the rest of the `(1 - s)` budget (see module doc)."""
    check_sparsity(s, "layer sparsity")
    if not 0.0 <= rho <= 1.0:
        raise ConfigError(f"sparse share rho must be in [0, 1], got {rho!r}")
    budget = in_features * out_features * (1.0 - s) * (1.0 - rho)
    # The epsilon keeps exact products (e.g. 0.5 * 0.2 * ...) from flooring one below.
    r = int(math.floor(budget / (in_features + out_features) + 1e-9))
    return min(r, min(in_features, out_features))


def check_rank(r: int, in_features: int, out_features: int) -> None:
    if r < 0 or r > min(in_features, out_features):
        raise ConfigError(f"rank {r} is outside [0, min(in, out)] = [0, {min(in_features, out_features)}] "
                          f"for a {out_features}x{in_features} linear")


@register_config
@dataclass
class RSparseConfig(MethodConfig):
    """R-Sparse artifact config. Per-linear (s, rho), thresholds and low-rank factors are tensors.

    mode: "rsparse" scores channels by |x_i|·‖W[:, i]‖ and routes the rest through a rank-r path;
    "teal" scores by |x_i| and drops the rest (TEAL-style baseline, no low-rank).
    sparsity: model-level budget (parameter-weighted mean of the per-linear s).
    sparse_share: uniform rho (used by search="uniform" and as the greedy's rho).
    """

    method: ClassVar[str] = "rsparse"
    version: ClassVar[int] = 1
    sparsity: float = 0.5
    sparse_share: float = 0.95
    mode: str = "rsparse"
    search: str = "greedy"
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        if not isinstance(self.sparse_share, (int, float)) or not 0.0 <= self.sparse_share <= 1.0:
            raise ConfigError(f"sparse_share must be in [0, 1], got {self.sparse_share!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.search not in SEARCHES:
            raise ConfigError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.targets is not None and not self.targets:
            raise ConfigError("rsparse: targets is an empty list (use None for every decoder linear)")
        if self.mode == "teal" and self.sparse_share != 1.0:
            raise ConfigError("mode='teal' has no low-rank path: sparse_share must be 1.0")


def teal_config(sparsity: float = 0.5, search: str = "uniform", **kw) -> RSparseConfig:
    """The TEAL-style baseline: magnitude thresholds, no low-rank path."""
    return RSparseConfig(sparsity=sparsity, sparse_share=1.0, mode="teal", search=search, **kw)
