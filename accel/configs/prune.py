"""`PruneConfig`: Wanda / magnitude masks, optionally refined by DSnoT."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from .base import ConfigError, MethodConfig, register_config

INIT_METHODS = ("wanda", "magnitude")
DSNOT_OBJECTIVES = ("mean", "mse-diag", "mse")  # calibrate/dsnot.py implements them
# How the layer-wise runner calibrates (calibrate/prune.py); a run option, not part of the config.
CALIB_MODES = ("auto", "joined", "two-pass")


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None, "N:M" -> (N, M) with 1 <= N < M; anything else -> ConfigError."""
    if pattern in ("", "unstructured", None):
        return None
    try:
        n_s, m_s = str(pattern).split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ConfigError(f"prune: pattern must be 'unstructured' or 'N:M' (e.g. 2:4), got {pattern!r}") from None
    if not (1 <= n < m):
        raise ConfigError(f"prune: bad N:M pattern {pattern!r}: need 1 <= N < M (N weights pruned in every M)")
    return n, m


@register_config
@dataclass
class PruneConfig(MethodConfig):
    """Weight pruning masks for the targeted linears.

    init: "wanda" (|W|·||X_j||, per output row) or "magnitude" (|W|, per layer).
    sparsity: fraction of weights pruned, in [0, 1); for N:M it must be N/M (or left None).
    pattern: "unstructured" or "N:M" (N pruned in every M consecutive inputs of a row).
    use_variant: Wanda's appendix variant (per-row cumulative-score threshold; unstructured only).
    dsnot: refine the mask with DSnoT (max_cycles, threshold, pow_var are its parameters).
    dsnot_objective: when DSnoT accepts a swap: "mse" (default: the layer's exact reconstruction
      error on the calibration inputs drops; needs X^T X per linear), "mse-diag" (same with inputs
      treated as uncorrelated) or "mean" (the paper's: |expected error| drops). Version 1 artifacts
      predate the field and load as "mean", which is what produced their masks.
    dsnot_sink_guard: DSnoT may not make a swap that raises a row's error on the first token of a
      calibration sample (the attention sink, whose massive activations DSnoT's averaged criterion
      otherwise trades away: on Qwen2.5-0.5B at 60% it turned DSnoT from worse than Wanda on wiki
      into better on both corpora). Version 1 and 2 artifacts predate it and load as False.
    targets/ignore: linear names, class names or `re:` regexes (see accel.patches.targets).
    """

    method: ClassVar[str] = "prune"
    # 2: dsnot_objective (default "mse"; version 1 behaved as "mean"); 3: dsnot_sink_guard (default
    # True; versions 1-2 ran without it).
    version: ClassVar[int] = 3
    init: str = "wanda"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    use_variant: bool = False
    dsnot: bool = False
    max_cycles: int = 50
    threshold: float = 0.1
    pow_var: float = 1.0
    dsnot_objective: str = "mse"
    dsnot_sink_guard: bool = True
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.init not in INIT_METHODS:
            raise ConfigError(f"prune: init must be one of {INIT_METHODS}, got {self.init!r}")
        nm = parse_nm(self.pattern)
        if nm is not None:
            if self.sparsity is None:
                self.sparsity = nm[0] / nm[1]
            elif not math.isclose(float(self.sparsity), nm[0] / nm[1], abs_tol=1e-9):
                raise ConfigError(f"prune: pattern {self.pattern} prunes {nm[0]}/{nm[1]} = {nm[0] / nm[1]:g} of the "
                                  f"weights; sparsity {self.sparsity} contradicts it (leave it unset)")
            if self.use_variant:
                raise ConfigError("prune: use_variant applies to unstructured sparsity only")
            self.pattern = f"{nm[0]}:{nm[1]}"
        else:
            self.pattern = "unstructured"
        s = self.sparsity
        if not isinstance(s, (int, float)) or isinstance(s, bool) or math.isnan(s) or not 0.0 <= s < 1.0:
            raise ConfigError(f"prune: sparsity must be in [0, 1), got {s!r}")
        self.sparsity = float(s)
        if self.use_variant and self.init != "wanda":
            raise ConfigError("prune: use_variant is a Wanda option (init='wanda')")
        if self.dsnot_objective not in DSNOT_OBJECTIVES:
            raise ConfigError(f"prune: dsnot_objective must be one of {DSNOT_OBJECTIVES}, got {self.dsnot_objective!r}")
        if not isinstance(self.max_cycles, int) or self.max_cycles < 0:
            raise ConfigError(f"prune: max_cycles must be a non-negative int, got {self.max_cycles!r}")
        if not (isinstance(self.threshold, (int, float)) and self.threshold >= 0):
            raise ConfigError(f"prune: threshold must be >= 0, got {self.threshold!r}")
        if self.pow_var < 0:
            # DSnoT divides by var ** pow_var; a negative power would reward high-variance channels.
            raise ConfigError(f"prune: pow_var must be >= 0, got {self.pow_var!r}")
        if self.targets is not None:
            self.targets = list(self.targets)
            if not self.targets:
                raise ConfigError("prune: targets is an empty list (use None for every decoder linear)")
        self.ignore = list(self.ignore or [])

    @classmethod
    def upgrade_params(cls, version, params: dict) -> dict:
        if version == 1:
            return {**params, "dsnot_objective": "mean", "dsnot_sink_guard": False}
        if version == 2:
            return {**params, "dsnot_sink_guard": False}
        return super().upgrade_params(version, params)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.pattern)

    @property
    def label(self) -> str:
        """E.g. "wanda", "magnitude+dsnot"."""
        return self.init + ("+dsnot" if self.dsnot else "")

    @property
    def needs_data(self) -> bool:
        return self.init == "wanda" or self.dsnot

    @property
    def needs_gram(self) -> bool:
        """Whether calibration must accumulate X^T X per linear input (DSnoT objective "mse")."""
        return self.dsnot and self.dsnot_objective == "mse"
