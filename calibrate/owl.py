"""OWL layer-wise sparsity allocation ("Outlier Weighed Layerwise sparsity", Yin et al., ICML 2024).

Layers whose Wanda scores |W_ij|·‖X_j‖ hold more outliers (entries above m × the layer mean) are
pruned less, the others more, so that the mean over layers stays the target:
    s_l = s − λ·(2·(D_l − min D)/(max D − min D)) + mean of that term.
All decoder layers of the supported models have the same parameter count, so the plain mean of
s_l is the model-level sparsity (up to the rounding of whole groups per row).
"""
from __future__ import annotations

import logging

import torch

from .runner import linear_input_stats, run_layerwise
from .wanda import wanda_scores

log = logging.getLogger(__name__)


class _OutlierRatios:
    """Runner method that changes nothing: per layer, the fraction of Wanda-score outliers."""

    def __init__(self, lins: dict, prefix: str, m: float):
        self.lins, self.prefix, self.m = lins, prefix, m
        self.ratio: dict[int, float] = {}

    def process_layer(self, i, layer, data):
        p = f"{self.prefix}.{i}."
        names = {n[len(p):]: lin for n, lin in self.lins.items() if n.startswith(p)}
        if not names:
            return {}
        sq = {}
        linear_input_stats(layer, data, i, names, lambda n, x: sq.__setitem__(n, sq.get(n, 0) + x.pow(2).sum(0)))
        hits = total = 0
        for n, lin in names.items():
            score = wanda_scores(lin.weight, sq[n])
            hits += int((score > self.m * score.mean()).sum())
            total += score.numel()
        self.ratio[i] = hits / total
        return {}

    def restore_layer(self, i, layer, tensors):  # pragma: no cover - never checkpointed
        raise NotImplementedError


def outlier_ratios(model, samples: torch.Tensor, lins: dict, prefix: str, m: float = 5.0,
                   progress: bool = True) -> dict[int, float]:
    """Decoder layer index -> outlier ratio D_l, on the unmodified model (one layer-wise pass).

    lins: full name -> target linear; samples: [N, L] token ids."""
    method = _OutlierRatios(lins, prefix, m)
    run_layerwise(model, samples, method, progress=progress, desc="OWL outlier ratios")
    return method.ratio


def owl_sparsities(ratios: dict[int, float], sparsity: float, lam: float) -> dict[int, float]:
    """Layer -> sparsity with mean `sparsity`, spread over ±lam by outlier ratio (more outliers,
    less sparse). lam is capped so that every layer stays in [0, 1)."""
    if not ratios:
        return {}
    capped = min(lam, sparsity, 0.9 * (1.0 - sparsity))
    if capped < lam:
        log.warning("OWL: owl_lambda=%.4g narrowed to %.4g so that every layer's sparsity stays in [0, 1) "
                    "around %.4g", lam, capped, sparsity)
    lam = capped
    idx = sorted(ratios)
    d = torch.tensor([ratios[i] for i in idx], dtype=torch.float64)
    span = float(d.max() - d.min())
    if lam <= 0 or span == 0.0:
        return {i: sparsity for i in idx}
    dn = (d - d.min()) / span * 2 * lam
    s = sparsity - dn + dn.mean()
    return {i: float(v) for i, v in zip(idx, s)}
