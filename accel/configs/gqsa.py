"""GQSA config: group-sparse, group-quantized weights with BQPO (stage 1) and E2E-OQP (stage 2)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base import ConfigError, MethodConfig, register_config


INITS = ("obs", "rtn")
ALLOCATIONS = ("owl", "uniform")


@register_config
@dataclass
class GQSAConfig(MethodConfig):
    """bits: code width (2/3/4/8); sparsity: fraction of groups pruned per row, in [0, 1);
    group_size: consecutive input channels per group (must divide each target's in_features);
    tile_rows: rows sharing one set of kept groups (1 = per row; >1 lets the CPU path compact
    pruned groups away). init: how stage 1 starts — "obs" (second-order group pruning with joint
    GPTQ rounding, errors folded into later columns through H^-1) or "rtn" (Wanda group scores,
    round to nearest; version-1 behaviour). allocation: "uniform" (every layer at `sparsity`) or
    "owl" (layer sparsities spread over ±owl_lambda by each layer's share of Wanda-score outliers
    above owl_m × its mean, same mean; see calibrate/owl.py). bqpo_*: stage-1 block optimisation; e2e_*: stage-2
    scale/zero tuning.
    bqpo_eval_samples: calibration samples (a fixed, seeded choice; 0 = all) on which BQPO measures
    the block error before training, every ceil(bqpo_eval_samples / bqpo_batch) steps and after the
    last; bqpo_keep_best: keep the lowest-error measured parameters, the stage-1 start included
    (False: the last step, version 2).
    e2e_holdout: fraction of the calibration samples held out of E2E-OQP training (0 = none, the
    version-2 behaviour); their LM loss is measured every e2e_eval_every steps and the stage ends
    with the best scales/zeros seen, stopping after e2e_patience evaluations without a gain.
    embedding_bits: None (default: the input embedding and lm_head stay dense), 4 or 8: the input
    embedding becomes packed rows of that width (round to nearest, asymmetric, one fp16
    scale/zero per embedding_group_size channels, like llama.cpp's Q4_1/Q8 blocks) gathered and
    dequantized per token, and the lm_head a dense (sparsity 0) GQSA linear of the same format,
    sharing the embedding's codes when the two are tied (docs/methods/gqsa.md)."""

    method: ClassVar[str] = "gqsa"
    # 3: bqpo_eval_samples/bqpo_keep_best and the E2E-OQP held-out guard (version 2 kept BQPO's
    # last step and trained E2E-OQP on every sample for e2e_steps). 4: embedding_bits /
    # embedding_group_size (version 3 kept the embedding and lm_head dense: embedding_bits None).
    version: ClassVar[int] = 4

    bits: int = 4
    sparsity: float = 0.5
    group_size: int = 16
    tile_rows: int = 1
    init: str = "obs"
    allocation: str = "owl"
    owl_lambda: float = 0.25
    owl_m: float = 5.0
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    bqpo_steps: int = 8
    bqpo_lr: float = 3e-4
    bqpo_batch: int = 2
    bqpo_eval_samples: int = 8
    bqpo_keep_best: bool = True
    e2e_steps: int = 0
    e2e_lr: float = 2e-5
    e2e_batch: int = 2
    e2e_holdout: float = 0.125
    e2e_eval_every: int = 16
    e2e_patience: int = 2
    embedding_bits: int | None = None
    embedding_group_size: int = 32

    @classmethod
    def upgrade_params(cls, version, params):
        # Version 1 had no `init`: its artifacts were made with Wanda scores + round to nearest.
        if version == 1:
            params = {**params, "init": "rtn", "allocation": "uniform"}
            version = 2
        if version == 2:
            params = {**params, "bqpo_keep_best": False, "bqpo_eval_samples": 0, "e2e_holdout": 0.0}
            version = 3
        if version == 3:
            return {**params, "embedding_bits": None}
        return super().upgrade_params(version, params)

    def validate(self) -> None:
        # Types (and finite floats) are checked from the annotations first (MethodConfig.check_types).
        if self.init not in INITS:
            raise ConfigError(f"gqsa: init={self.init!r} is not supported; choose one of {', '.join(INITS)}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"gqsa: allocation={self.allocation!r} is not supported; choose one of "
                              f"{', '.join(ALLOCATIONS)}")
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"gqsa: bits={self.bits} is not supported; choose 2, 3, 4 or 8")
        if not (0.0 <= self.sparsity < 1.0):
            raise ConfigError(f"gqsa: sparsity={self.sparsity} must be in [0, 1)")
        if not (0.0 <= self.owl_lambda < 1.0):
            raise ConfigError(f"gqsa: owl_lambda={self.owl_lambda} must be in [0, 1)")
        if self.owl_m <= 0:
            raise ConfigError(f"gqsa: owl_m={self.owl_m} must be > 0")
        if self.allocation == "owl" and self.sparsity > 0 and not (0.0 <= self.sparsity - self.owl_lambda
                                                                   and self.sparsity + self.owl_lambda < 1.0):
            # OWL spreads layer sparsities over sparsity ± owl_lambda; every layer must stay in [0, 1).
            # (sparsity 0 quantizes only: calibration skips OWL then.)
            raise ConfigError(f"gqsa: owl_lambda={self.owl_lambda} spreads layer sparsities over "
                              f"{self.sparsity - self.owl_lambda:g}..{self.sparsity + self.owl_lambda:g}, outside "
                              f"[0, 1) for sparsity={self.sparsity}; choose owl_lambda <= "
                              f"{min(self.sparsity, 1.0 - self.sparsity):.4g} (strictly below 1 - sparsity) "
                              f"or allocation='uniform'")
        if self.embedding_bits not in (None, 4, 8):
            raise ConfigError(f"gqsa: embedding_bits={self.embedding_bits!r} is not supported; choose 4, 8 or "
                              f"None (embedding and lm_head stay dense)")
        if self.embedding_group_size < 1:
            raise ConfigError(f"gqsa: embedding_group_size={self.embedding_group_size} must be a positive integer")
        if self.targets is not None and not self.targets:
            raise ConfigError("gqsa: targets is an empty list (use None for every decoder linear)")
        if self.group_size < 1:
            raise ConfigError(f"gqsa: group_size={self.group_size} must be a positive integer")
        if self.tile_rows < 1:
            raise ConfigError(f"gqsa: tile_rows={self.tile_rows} must be >= 1")
        for name in ("bqpo_steps", "e2e_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"gqsa: {name}={getattr(self, name)} must be >= 0")
        if self.bqpo_eval_samples < 0:
            raise ConfigError(f"gqsa: bqpo_eval_samples={self.bqpo_eval_samples} must be >= 0 (0 = every sample)")
        if not (0.0 <= self.e2e_holdout < 1.0):
            raise ConfigError(f"gqsa: e2e_holdout={self.e2e_holdout} must be in [0, 1) (a fraction of the "
                              f"calibration samples; 0 = no held-out guard)")
        for name in ("bqpo_batch", "e2e_batch", "e2e_eval_every", "e2e_patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"gqsa: {name}={getattr(self, name)} must be >= 1")
        for lr, steps in (("bqpo_lr", "bqpo_steps"), ("e2e_lr", "e2e_steps")):
            # A zero learning rate is harmless only when its stage does not run.
            v, n = getattr(self, lr), getattr(self, steps)
            if v < 0 or (n > 0 and v == 0):
                raise ConfigError(f"gqsa: {lr}={v} must be > 0" + (f" ({steps}={n})" if n > 0 else " (or 0)"))

    def check_linear(self, name: str, in_features: int) -> None:
        """Raise ConfigError if this config cannot be applied to a linear with in_features."""
        if in_features % self.group_size:
            raise ConfigError(f"gqsa: group_size={self.group_size} does not divide in_features={in_features} "
                              f"of {name}")
