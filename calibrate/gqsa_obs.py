"""GQSA stage-1 initialisation by second-order (OBS) group pruning with joint GPTQ quantization.

Why: Wanda group scores + round-to-nearest leave every error where it falls; with whole 16-wide
groups removed from each row that error is large (SmolLM2 W4S50 g16: ppl ~1e4 before BQPO).
SparseGPT/GPTQ instead fold each pruned or rounded weight's error into the not-yet-processed
columns of the same row through the inverse Hessian of the layer input, H = X^T X. Here the
pruning unit is a group of g consecutive input columns, chosen per row (or per tile of rows) by
the OBS saliency sum_{j in group} w_j^2 / [U]_jj^2 (U = upper Cholesky factor of H^-1), and each
kept group gets its asymmetric min/max grid from its already-updated weights when the sweep reaches
it, exactly as GPTQ does with grouped quantization.
"""
from __future__ import annotations

import torch

from accel.kernels.gqsa_linear.format import minmax_params, select_groups


def hessian_inverse_factor(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """h: [in, in] (sum of x x^T) -> (U, dead): U upper Cholesky factor of (h + damp·mean(diag)·I)^-1;
    dead: [in] bool, input channels that never fired (their weights carry no signal)."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    idx = torch.arange(h.size(0))
    h[idx, idx] += damp * torch.diag(h).mean()
    # A damped Gram matrix is positive definite; retry with more damping if rounding says otherwise.
    for extra in (0.0, 0.1, 1.0):
        try:
            if extra:
                h[idx, idx] += extra * torch.diag(h).mean()
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
            return torch.linalg.cholesky(hinv, upper=True).float(), dead
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("gqsa: the layer-input Hessian is not positive definite even when damped")


def obs_group_prune_quant(weight: torch.Tensor, h: torch.Tensor, group_size: int, bits: int,
                          sparsity: float, tile_rows: int = 1, blocksize: int = 128,
                          damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune whole groups and quantize the kept ones, compensating through H^-1.

    weight: [out, in]; h: [in, in] = sum over calibration tokens of x x^T.
    Returns (w_q [out, in] fp32 with pruned groups zero and kept weights on their grid,
             cols [out, n_keep] int64 sorted kept group indices,
             scale [out, n_keep], zero [out, n_keep]) — the grid of each kept group.
    """
    g = group_size
    w = weight.detach().float().clone()
    out, n_in = w.shape
    u, dead = hessian_inverse_factor(h.to(w.device), damp)
    u = u.to(w.device)
    w[:, dead] = 0.0
    scores = (w.pow(2) / torch.diag(u).pow(2)[None]).view(out, -1, g).sum(-1)
    cols = select_groups(scores, sparsity, tile_rows)
    keep = torch.zeros(out, n_in // g, dtype=torch.bool, device=w.device)
    keep.scatter_(1, cols, True)
    keep = keep.repeat_interleave(g, dim=1)
    qmax = 2 ** bits - 1
    scale_all = torch.ones(out, n_in // g, device=w.device)
    zero_all = torch.zeros(out, n_in // g, device=w.device)
    # Blocks must hold whole groups so a group's grid is set from the block's updated weights.
    bs = max(g, (blocksize // g) * g)
    for i1 in range(0, n_in, bs):
        i2 = min(i1 + bs, n_in)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        q1, e1 = torch.zeros_like(w1), torch.zeros_like(w1)
        s = z = None
        for j in range(i2 - i1):
            if j % g == 0:
                s, z = minmax_params(w1[:, j:j + g], bits)
                # The grid as it will be stored (fp16), so packing reproduces w_q exactly.
                s, z = s.half().float(), z.half().float()
                scale_all[:, (i1 + j) // g], zero_all[:, (i1 + j) // g] = s, z
            col = w1[:, j]
            q = (torch.clamp(torch.round(col / s + z), 0, qmax) - z) * s
            q = torch.where(keep[:, i1 + j], q, torch.zeros_like(q))
            q1[:, j] = q
            err = (col - q) / u1[j, j]
            w1[:, j:] -= err[:, None] * u1[j, j:][None, :]
            e1[:, j] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= e1 @ u[i1:i2, i2:]
    scale = torch.gather(scale_all, 1, cols)
    zero = torch.gather(zero_all, 1, cols)
    return w, cols, scale, zero
