"""Per-linear (s, rho) allocation under a model-level budget for R-Sparse / TEAL.

Budget: the parameter-weighted mean of the per-linear sparsity s_j (weights n_j = in_j·out_j)
equals the target S exactly (to float rounding). Three allocators:

  uniform  s_j = S, rho_j = rho
  greedy   (TEAL-style, per decoder layer) from measured block-output errors e_j(s) of each linear
           alone on a grid of s: repeatedly give the next slice of the layer's budget to the linear
           whose error grows least per parameter, until the layer reaches S.
  evo      the R-Sparse paper's evolutionary search over (s_j, rho_j), seeded with the greedy (or
           uniform) recipe; mutations are projected back onto the budget; fitness = calibration NLL.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

S_MAX = 0.95


def budget_of(s: torch.Tensor, n: torch.Tensor) -> float:
    """Parameter-weighted mean sparsity. s, n: [L]."""
    return float((s.double() * n.double()).sum() / n.double().sum())


def project_budget(s: torch.Tensor, n: torch.Tensor, target: float, s_max: float = S_MAX) -> torch.Tensor:
    """Closest (by a common shift) s' = clip(s + λ, 0, s_max) with budget_of(s', n) == target.

    Bisection on λ, then the tiny residual is absorbed by the unclipped entry with most room, so
    the budget holds to float64 rounding.
    """
    if not 0.0 <= target <= s_max:
        raise ValueError(f"target sparsity {target} outside [0, {s_max}]")
    s, n = s.double(), n.double()
    lo, hi = -1.0 - s_max, 1.0 + s_max
    for _ in range(100):
        mid = (lo + hi) / 2
        if budget_of((s + mid).clamp(0, s_max), n) < target:
            lo = mid
        else:
            hi = mid
    out = (s + (lo + hi) / 2).clamp(0, s_max)
    resid = (target - budget_of(out, n)) * float(n.sum())
    room = (s_max - out if resid > 0 else out) * n
    j = int(room.argmax())
    out[j] = (out[j] + resid / n[j]).clamp(0, s_max)
    return out


def greedy_layer(errors: torch.Tensor, grid: Sequence[float], n: torch.Tensor, steps: int = 400) -> torch.Tensor:
    """One decoder layer's greedy path: [steps + 1, L] per-linear s at layer sparsity k/steps·s_max.

    errors: [L, G] block-output error of linear j alone at sparsity grid[g] (grid[0] = 0);
    n: [L] parameter counts. Errors are interpolated linearly between grid points.
    """
    g = torch.tensor(list(grid), dtype=torch.float64)
    e = errors.double()
    n = n.double()

    def err_at(j: int, s: float) -> float:
        return float(torch_interp(torch.tensor([s], dtype=torch.float64), g, e[j])[0])

    total = float(n.sum())
    s = torch.zeros(len(n), dtype=torch.float64)
    path = [s.clone()]
    step_params = total * min(S_MAX, float(g[-1])) / steps
    for _ in range(steps):
        best, best_cost = -1, float("inf")
        for j in range(len(n)):
            ds = step_params / float(n[j])
            if s[j] + ds > float(g[-1]) + 1e-12:
                continue
            cost = (err_at(j, float(s[j]) + ds) - err_at(j, float(s[j])))
            if cost < best_cost:
                best, best_cost = j, cost
        if best < 0:
            break
        s[best] += step_params / float(n[best])
        path.append(s.clone())
    return torch.stack(path)


def torch_interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    idx = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return y0 + (y1 - y0) * ((x - x0) / (x1 - x0)).clamp(0, 1)


def greedy_at(path: torch.Tensor, n: torch.Tensor, target: float) -> torch.Tensor:
    """Read a layer's greedy path at layer sparsity `target`, interpolating between steps (exact)."""
    levels = torch.tensor([budget_of(p, n) for p in path], dtype=torch.float64)
    if target > float(levels[-1]) + 1e-12:
        raise ValueError(f"greedy path reaches only {float(levels[-1]):.3f} layer sparsity < {target}")
    k = int(torch.searchsorted(levels, torch.tensor([target], dtype=torch.float64)).clamp(1, len(levels) - 1))
    t = (target - float(levels[k - 1])) / max(float(levels[k] - levels[k - 1]), 1e-300)
    s = path[k - 1] + (path[k] - path[k - 1]) * min(max(t, 0.0), 1.0)
    return project_budget(s, n, target)


@dataclass
class EvoSettings:
    population: int = 6
    generations: int = 4
    mutate_frac: float = 0.15
    sigma_s: float = 0.08
    sigma_rho: float = 0.1
    seed: int = 0


def evolutionary_search(seed_s: torch.Tensor, seed_rho: torch.Tensor, n: torch.Tensor, target: float,
                        fitness: Callable[[torch.Tensor, torch.Tensor], float], settings: EvoSettings,
                        progress: bool = True, state: dict | None = None,
                        on_generation: Callable[[dict], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Minimise `fitness(s, rho)` (calibration NLL) over per-linear (s, rho) with budget_of(s) == target.

    Elitist (mu + lambda): the seed is in the first population, so the result is never worse than
    it on the calibration objective. `state`/`on_generation` let a caller checkpoint and resume.
    Returns (s, rho, history of best fitness per generation).
    """
    rng = random.Random(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    L = len(n)

    def mutate(s, rho):
        s, rho = s.clone(), rho.clone()
        pick = torch.rand(L, generator=gen) < settings.mutate_frac
        s[pick] += torch.randn(int(pick.sum()), generator=gen, dtype=torch.float64) * settings.sigma_s
        rho[pick] = (rho[pick] + torch.randn(int(pick.sum()), generator=gen, dtype=torch.float64)
                     * settings.sigma_rho).clamp(0.0, 1.0)
        return project_budget(s, n, target), rho

    def cross(a, b):
        take = torch.rand(L, generator=gen) < 0.5
        return project_budget(torch.where(take, a[0], b[0]), n, target), torch.where(take, a[1], b[1])

    if state and state.get("population"):
        pop = [(torch.tensor(p["s"], dtype=torch.float64), torch.tensor(p["rho"], dtype=torch.float64), p["fit"])
               for p in state["population"]]
        history, start = list(state["history"]), state["generation"] + 1
    else:
        s0, r0 = project_budget(seed_s.double(), n, target), seed_rho.double()
        pop = [(s0, r0, fitness(s0, r0))]
        while len(pop) < settings.population:
            s, r = mutate(s0, r0)
            pop.append((s, r, fitness(s, r)))
        history, start = [min(p[2] for p in pop)], 0
    bar = tqdm(range(start, settings.generations), desc="evo search", disable=not progress, unit="gen")
    for g in bar:
        pop.sort(key=lambda p: p[2])
        parents = pop[: max(2, settings.population // 2)]
        children = []
        for _ in range(settings.population):
            a, b = rng.sample(parents, 2)
            s, r = mutate(*cross(a, b))
            children.append((s, r, fitness(s, r)))
        pop = sorted(parents + children, key=lambda p: p[2])[: settings.population]
        history.append(pop[0][2])
        bar.set_postfix(best=f"{pop[0][2]:.4f}")
        log.info("evo generation %d: best calibration NLL %.4f", g, pop[0][2])
        if on_generation:
            on_generation({"generation": g, "history": history,
                           "population": [{"s": p[0].tolist(), "rho": p[1].tolist(), "fit": p[2]} for p in pop]})
    best = min(pop, key=lambda p: p[2])
    return best[0], best[1], history
