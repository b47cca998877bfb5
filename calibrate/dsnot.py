"""DSnoT (Zhang et al., ICLR 2024): training-free prune-and-grow refinement of a sparse mask.

For each output row i of a linear `W: [out, in]` with calibration inputs X, the signed expected
reconstruction error of the sparse row is

    eps_i = sum_{j pruned in row i} c_ij,     c_ij = W_ij * mu_j

(expected dense output minus expected sparse output). Each cycle swaps one weight per row:
  * grow the pruned weight with the largest |c_ij| / Var_j^p of the sign that shrinks eps_i
    (c > 0 when eps_i > 0), and
  * prune the kept weight with the lowest Wanda score |W_ij|·||X_j|| whose c has the opposite
    sign (for N:M: the lowest-Wanda kept weight in the grown weight's M-block, so the pattern holds),
so every row keeps exactly its number of pruned weights. Rows stop once |eps_i| <= threshold, a
candidate list runs out, or after `max_cycles`. Weight values never change.

Units follow the official code so that its default threshold (0.1) means the same thing: mu_j is
the per-sample *sum* over tokens of x_j, averaged over samples (= tokens_per_sample * E[x_j]).

Objectives (`objective`), i.e. when a proposed swap is accepted; the candidates are always DSnoT's:
  * "mean" (the paper's): the swap strictly lowers |eps_i|. Only the expected error is driven to 0;
    its variance is ignored, so the real reconstruction error can rise.
  * "mse-diag": the swap strictly lowers E[e_i^2] = eps_i^2 + sum_{j pruned} W_ij^2 Var_j
    (per-token units, inputs treated as uncorrelated), e_i = sum_{j pruned} W_ij x_j.
  * "mse": the swap strictly lowers E[e_i^2] = w_P^T H w_P, H = E[x x^T] (the calibration second
    moment, `gram`), i.e. the exact layer-wise reconstruction objective on the calibration data:
    then DSnoT never raises ||(W - W_sparse) X^T||^2 on those inputs.

Differences from the official code (zyxxmu/DSnoT), on purpose:
  * a swap is accepted only if it strictly lowers the objective (the official code can overshoot);
    a rejected swap advances the growth pointer only, so the objective never increases;
  * the growth list is checked for sign, so its pointers never walk into kept entries;
  * candidate lists are top-k (k = max_cycles) rather than full sorts: the same entries are reached;
  * it is applied to every linear, MLPs included (the official default skips `mlp.*`).

All rows run in parallel; a cycle is a handful of gathers over `[out]` vectors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from accel.configs.prune import DSNOT_OBJECTIVES


@dataclass
class DSnoTResult:
    keep: torch.Tensor          # [out, in] bool, the refined mask
    eps_before: torch.Tensor    # [out] signed error of the initial mask
    eps_after: torch.Tensor     # [out] signed error of the refined mask
    swaps: torch.Tensor         # [out] accepted swaps per row
    cycles: int                 # cycles run


# Input widths at or above this get the symmetric, block-triangular Gram product (below it the
# single matmul is as fast).
GRAM_BLOCK = 512


def gram_fp32(x: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """X^T X ([in, in], fp32) of x: [tokens, in], computing only the blocks on and above the
    diagonal and mirroring them: ~(1 + block/in)/2 of the full product's flops.

    Why: for DSnoT's "mse" objective this product is most of the layer's cost (the MLP's down
    projection has a 4864-wide input on Qwen2.5-0.5B). Every entry is the same length-`tokens`
    dot product as in `x.t() @ x`; on MKL (this project's CPU torch) the result is bit-identical,
    and on other BLAS it can differ only by rounding of the summation order."""
    n = x.size(1)
    if n < 2 * block:
        return x.t() @ x
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for i in range(0, n, block):
        blk = x[:, i:i + block].t() @ x[:, i:]
        out[i:i + block, i:] = blk
        out[i:, i:i + block] = blk.t()
    return out


def reconstruction_error(weight: torch.Tensor, keep: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """eps: [out] = sum over pruned j of W_ij * mu_j (fp64 for an exact reference)."""
    c = weight.detach().double() * mu.double().unsqueeze(0)
    return (c * (~keep)).sum(dim=1)


def reconstruction_mse(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """E[e_i^2] per row: [out] = w_P^T H w_P, H = gram = E[x x^T] ([in, in]); fp64."""
    wp = weight.detach().double() * (~keep)
    return ((wp @ gram.double()) * wp).sum(dim=1)


OBJECTIVES = DSNOT_OBJECTIVES
# "mse" accepts a swap only if it lowers the row's error by more than this fraction of it.
MSE_RTOL = 1e-5


def dsnot_refine(weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 sq_norm: torch.Tensor, tokens_per_sample: int, nm: tuple[int, int] | None = None,
                 max_cycles: int = 50, threshold: float = 0.1, pow_var: float = 1.0,
                 objective: str = "mean", gram: torch.Tensor | None = None,
                 guard: torch.Tensor | None = None) -> DSnoTResult:
    """Refine `keep` ([out, in] bool) for `weight` ([out, in]).

    mean, var: [in] per-token mean and population variance of the inputs; sq_norm: [in] sum of x^2
    (Wanda's statistic); tokens_per_sample: calibration sequence length (threshold units, above);
    objective: "mean" | "mse-diag" | "mse" (above); gram: [in, in] E[x x^T], needed for "mse".
    guard: optional [n, in] inputs (the first token of each calibration sample: the attention
    sinks) whose squared error per row no swap may raise (`_SinkGuard`); None = no guard.

    Each cycle: growth candidates (`_Growth`) and pruning candidates (`_PruneUnstructured` or
    `_PruneNM`) propose one swap per row, the objective (`_OBJECTIVES[objective]`) accepts or
    rejects it, then the mask and the pointers advance.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"DSnoT objective must be one of {OBJECTIVES}, got {objective!r}")
    if guard is not None and (guard.dim() != 2 or guard.size(1) != weight.size(1)):
        raise ValueError(f"DSnoT guard must be [n, {weight.size(1)}] inputs, got {tuple(guard.shape)}")
    if objective == "mse" and (gram is None or gram.shape != (weight.size(1), weight.size(1))):
        raise ValueError(f"DSnoT objective 'mse' needs gram [in, in], got "
                         f"{None if gram is None else tuple(gram.shape)}")
    out, n_in = weight.shape
    w = weight.detach().float()
    keep = keep.clone()
    mu = mean.float() * float(tokens_per_sample)
    c = w * mu.unsqueeze(0)
    wscore = w.abs() * sq_norm.float().clamp_min(0).sqrt().unsqueeze(0)
    pruned0 = ~keep
    eps = (c.double() * pruned0).sum(dim=1)
    eps0 = eps.clone()
    # Every tensor below lives on the weight's device (the runner may calibrate on an accelerator).
    rows = torch.arange(out, device=w.device)
    obj = _OBJECTIVES[objective](w, pruned0, var, tokens_per_sample, gram)
    # Each pointer advances at most once per cycle, so only the first max_cycles entries of every
    # candidate list can ever be reached: top-k instead of full sorts (the sorts dominated the cost).
    k = max(1, min(max_cycles, n_in))
    grow = _Growth(c, var, pruned0, pow_var, k)
    prune = _PruneUnstructured(keep, c, wscore, k) if nm is None else _PruneNM(keep, wscore, nm[1])
    sink = None if guard is None else _SinkGuard(w, pruned0, guard)

    swaps = torch.zeros(out, dtype=torch.long, device=w.device)
    active = torch.ones(out, dtype=torch.bool, device=w.device)
    cycles = 0
    for cycles in range(1, max_cycles + 1):
        active &= eps.abs() > threshold
        if not bool(active.any()):
            cycles -= 1
            break
        up = eps > 0
        gi, valid_g = grow.propose(rows, up)
        pi, valid_p = prune.propose(rows, up, gi)
        trying = active & valid_g & valid_p
        eps_new = eps + c[rows, pi].double() - c[rows, gi].double()
        # The guard vetoes before the objective sees the swap (objectives update state on accept).
        ok = trying if sink is None else trying & sink.allows(rows, gi, pi)
        accept = obj.accept(rows, ok, gi, pi, eps, eps_new)
        if sink is not None:
            sink.update(accept)
        active &= valid_g & valid_p
        ra = rows[accept]
        keep[ra, gi[accept]] = True
        keep[ra, pi[accept]] = False
        eps = torch.where(accept, eps_new, eps)
        swaps += accept.long()
        grow.advance(trying, up)
        prune.advance(accept, up, ra, pi)
    return DSnoTResult(keep, eps0, eps, swaps, cycles)


# ---- candidates ---------------------------------------------------------------------------
class _Growth:
    """Growth candidates (initially pruned weights), most positive and most negative
    g = c / Var^p first; a row whose error is positive grows a positive one, and vice versa."""

    def __init__(self, c, var, pruned0, pow_var: float, k: int):
        out = c.size(0)
        self.k = k
        self.g = torch.where(pruned0, c / var.float().clamp_min(1e-12).pow(pow_var).unsqueeze(0), torch.zeros(()))
        self.hi = self.g.topk(k, dim=1, largest=True).indices
        self.lo = self.g.topk(k, dim=1, largest=False).indices
        self.top = torch.zeros(out, dtype=torch.long, device=c.device)
        self.bot = torch.zeros(out, dtype=torch.long, device=c.device)

    def propose(self, rows, up):
        k = self.k
        gi = torch.where(up, self.hi[rows, self.top.clamp(max=k - 1)], self.lo[rows, self.bot.clamp(max=k - 1)])
        gval = self.g[rows, gi]
        return gi, torch.where(up, (gval > 0) & (self.top < k), (gval < 0) & (self.bot < k))

    def advance(self, trying, up) -> None:
        # A rejected swap advances the growth pointer too: the next cycle tries the next weight.
        self.top += (trying & up).long()
        self.bot += (trying & ~up).long()


class _PruneUnstructured:
    """Pruning candidates: kept weights whose c has the sign opposite to the row's error,
    lowest Wanda score first."""

    def __init__(self, keep, c, wscore, k: int):
        out, dev = c.size(0), c.device
        inf = torch.tensor(float("inf"), device=dev)
        self.k = k
        self.key_neg = torch.where(keep & (c < 0), wscore, inf)
        self.key_pos = torch.where(keep & (c > 0), wscore, inf)
        self.neg = self.key_neg.topk(k, dim=1, largest=False).indices
        self.pos = self.key_pos.topk(k, dim=1, largest=False).indices
        self.pn = torch.zeros(out, dtype=torch.long, device=dev)
        self.pp = torch.zeros(out, dtype=torch.long, device=dev)

    def propose(self, rows, up, gi):
        k = self.k
        pi_up = self.neg[rows, self.pn.clamp(max=k - 1)]
        pi_dn = self.pos[rows, self.pp.clamp(max=k - 1)]
        valid = torch.where(up, torch.isfinite(self.key_neg[rows, pi_up]) & (self.pn < k),
                            torch.isfinite(self.key_pos[rows, pi_dn]) & (self.pp < k))
        return torch.where(up, pi_up, pi_dn), valid

    def advance(self, accept, up, ra, pi) -> None:
        self.pn += (accept & up).long()
        self.pp += (accept & ~up).long()


class _PruneNM:
    """N:M pruning candidates: the lowest-Wanda kept weight in the grown weight's M-block, so the
    pattern holds; a grown weight is never pruned again."""

    def __init__(self, keep, wscore, m: int):
        self.m = m
        self.inf = torch.tensor(float("inf"), device=wscore.device)
        self.key = torch.where(keep, wscore, self.inf)

    def propose(self, rows, up, gi):
        out, n_in = self.key.shape
        block = gi // self.m
        blk = self.key.view(out, n_in // self.m, self.m)[rows, block]
        best = blk.argmin(dim=1)
        return block * self.m + best, torch.isfinite(blk[rows, best])

    def advance(self, accept, up, ra, pi) -> None:
        self.key[ra, pi[accept]] = self.inf


class _SinkGuard:
    """Vetoes a swap that raises the row's squared error on the guard tokens.

    Why: on Qwen2.5-0.5B the first token of every sequence (the attention sink) carries massive
    activations from layer 2 on (|h| ~1100 vs ~12 elsewhere). Every objective above averages over
    tokens, so DSnoT's swaps, fitted to the typical token, raised the sink token's error at layer
    3's output from 0.14 (Wanda) to 0.42 (relative, calibration samples) while lowering the rest,
    and wiki perplexity rose. With the guard a swap must not raise the error of those tokens."""

    def __init__(self, w, pruned0, guard):
        self.w = w
        self.xt = guard.float().t().contiguous()          # [in, n]
        self.r = (w * pruned0) @ self.xt                  # [out, n]: error per row and guard token
        self.r_new = self.r

    def allows(self, rows, gi, pi):
        a, b = self.w[rows, gi].unsqueeze(1), self.w[rows, pi].unsqueeze(1)
        # Swap: w_P -> w_P - a e_g + b e_p, so each guard token's error moves by b x_p - a x_g.
        self.r_new = self.r + b * self.xt[pi] - a * self.xt[gi]
        return self.r_new.double().pow(2).sum(1) <= self.r.double().pow(2).sum(1)

    def update(self, accept) -> None:
        self.r = torch.where(accept.unsqueeze(1), self.r_new, self.r)


# ---- objectives: when a proposed swap is accepted -------------------------------------------
class _MeanObjective:
    """The paper's: the swap strictly lowers |eps_i|."""

    def __init__(self, w, pruned0, var, tokens_per_sample, gram):
        pass

    def accept(self, rows, trying, gi, pi, eps, eps_new):
        return trying & (eps_new.abs() < eps.abs())


class _MseDiagObjective:
    """The swap strictly lowers eps^2 / L^2 + sum_{j pruned} W_ij^2 Var_j (per-token units)."""

    def __init__(self, w, pruned0, var, tokens_per_sample, gram):
        self.wv = w.double().pow(2) * var.double().clamp_min(0).unsqueeze(0)
        self.dvar = (self.wv * pruned0).sum(dim=1)
        self.inv_l2 = 1.0 / float(tokens_per_sample) ** 2

    def accept(self, rows, trying, gi, pi, eps, eps_new):
        dvar_new = self.dvar + self.wv[rows, pi] - self.wv[rows, gi]
        accept = trying & ((eps_new.pow(2) - eps.pow(2)) * self.inv_l2 + dvar_new - self.dvar < 0)
        self.dvar = torch.where(accept, dvar_new, self.dvar)
        return accept


class _MseObjective:
    """The swap lowers w_P^T H w_P (H = gram) by more than MSE_RTOL of it."""

    def __init__(self, w, pruned0, var, tokens_per_sample, gram):
        # fp32: the [out, in] x [in, in] product and the per-swap row updates dominate the cost,
        # and fp64 doubled it. Rounding is covered by accepting only a clear decrease.
        self.w, self.h = w, gram.float()
        self.u = (w * pruned0) @ self.h               # [out, in]: (H w_P) per row; objective w_P . u
        self.hdiag = self.h.diagonal()
        self.obj = (w * pruned0 * self.u).sum(dim=1).double()

    def accept(self, rows, trying, gi, pi, eps, eps_new):
        w, h, u = self.w, self.h, self.u
        # Swap: w_P -> w_P - a e_g + b e_p (a = W_ig grown, b = W_ip pruned).
        a, b = w[rows, gi].double(), w[rows, pi].double()
        delta = (b * b * self.hdiag[pi] + a * a * self.hdiag[gi] - 2 * a * b * h[gi, pi]
                 + 2 * b * u[rows, pi] - 2 * a * u[rows, gi])
        # A swap must lower the row's error by more than fp32 rounding of u could hide.
        accept = trying & (delta < -MSE_RTOL * self.obj.abs())
        self.obj = torch.where(accept, self.obj + delta, self.obj)
        ra = rows[accept]
        if len(ra):
            upd = h.index_select(0, pi[accept]).mul_(b[accept].float().unsqueeze(1))
            upd.sub_(h.index_select(0, gi[accept]).mul_(a[accept].float().unsqueeze(1)))
            u.index_add_(0, ra, upd)
        return accept


_OBJECTIVES = {"mean": _MeanObjective, "mse-diag": _MseDiagObjective, "mse": _MseObjective}
