"""R-Sparse / TEAL calibration: statistics (one layer-sequential pass), allocation, artifact.

    stats = collect_stats(model, samples)          # per linear: score quantile tables (R-Sparse
                                                   # |x|·‖W[:,i]‖ and TEAL |x|), per layer: block
                                                   # errors of each linear alone on an s grid
    alloc = allocate(model, stats, cfg, ...)       # per linear (s, rho): uniform | greedy | evo
    art   = build_artifact(model, stats, alloc, cfg)

Statistics are taken on dense upstream activations (like the official code and TEAL), so one pass
serves every target sparsity and every method of a sweep. Thresholds are the (1 − (1−s)·rho)
quantile of the linear's score over all calibration tokens × channels.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from accel.configs.rsparse import RSparseConfig, active_fraction, rank_for
from accel.patches import compat
from accel.patches.rsparse import RSparseLinear, channel_scale, swapped
from accel.patches.targets import iter_linears

from .checkpoint import CheckpointDir, checkpoint_key, refuse_foreign_top, weights_digest
from .registry import register_calibrator
from .runner import (CalibrationError, LayerData, check_model, check_samples, check_seq_len, linear_input_stats,
                     run_layerwise)
from .rsparse_search import EvoSettings, evolutionary_search, greedy_at, greedy_layer, project_budget

log = logging.getLogger(__name__)

Q_POINTS = 4097
MAX_SCORE_SAMPLES = 1 << 18
GRID = (0.0, 0.3, 0.6, 0.9)
MODES = ("rsparse", "teal")


@dataclass
class RSparseStats:
    names: list[str]
    shapes: dict[str, tuple[int, int]]
    quantiles: dict[str, torch.Tensor] = field(default_factory=dict)   # "<mode>:<name>" -> [Q]
    errors: dict[str, torch.Tensor] = field(default_factory=dict)      # "<mode>:<layer>" -> [L_i, G]
    layer_of: dict[str, int] = field(default_factory=dict)
    rho_grid: float = 0.95
    # Truncated-SVD factors of the targeted weights (not saved): the statistics pass computes
    # them and building the artifact reuses them, so each weight is decomposed once per run.
    svd: "_SVDCache | None" = field(default=None, repr=False, compare=False)

    def threshold(self, mode: str, name: str, s: float, rho: float) -> float:
        """Score quantile at 1 − active fraction, linearly interpolated in the table."""
        q = self.quantiles[f"{mode}:{name}"]
        a = active_fraction(s, rho)
        if a >= 1.0:
            return -1.0
        if a <= 0.0:
            return math.inf
        pos = (1.0 - a) * (len(q) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(q) - 1)
        return float(q[lo] + (q[hi] - q[lo]) * (pos - lo))

    def counts(self) -> torch.Tensor:
        return torch.tensor([self.shapes[n][0] * self.shapes[n][1] for n in self.names], dtype=torch.float64)


class _SVDCache:
    """Truncated SVD factors of each targeted weight: down = Σ_r V_rᵀ [r, in], up = U_r [out, r]."""

    def __init__(self, model):
        self.model, self._c = model, {}

    def factors(self, name: str, r: int):
        if r <= 0:
            return None, None
        if name not in self._c:
            w = self.model.get_submodule(name).weight.detach().double().cpu()
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            self._c[name] = (u.float(), (s[:, None] * vh).float())
        u, svh = self._c[name]
        return svh[:r].contiguous(), u[:, :r].contiguous()


def make_linear(model, stats: RSparseStats, svd: _SVDCache, name: str, mode: str, s: float, rho: float):
    lin = model.get_submodule(name)
    if isinstance(lin, RSparseLinear):
        raise CalibrationError(f"{name} is already an R-Sparse linear; unpatch the model before calibrating")
    out_f, in_f = stats.shapes[name]
    r = rank_for(in_f, out_f, s, rho) if mode == "rsparse" else 0
    down, up = svd.factors(name, r)
    return RSparseLinear(lin, stats.threshold(mode, name, s, rho), channel_scale(lin, mode), down, up, s, rho)


class _StatsMethod:
    """LayerMethod for run_layerwise: quantile tables and per-linear block-error grids; the layer
    itself is left dense (so one pass serves all levels)."""

    def __init__(self, model, stats: RSparseStats, modes, grid, greedy_tokens: int):
        self.model, self.stats, self.modes, self.grid = model, stats, modes, grid
        self.greedy_tokens = greedy_tokens
        self.svd = stats.svd if stats.svd is not None else _SVDCache(model)
        stats.svd = self.svd
        self.gen = torch.Generator().manual_seed(0)

    def _names(self, i):
        return [n for n in self.stats.names if self.stats.layer_of[n] == i]

    def process_layer(self, i, layer, data: LayerData):
        names = self._names(i)
        prefix = _layer_prefix(self.model, i)
        mods = {n: self.model.get_submodule(n) for n in names}
        xs: dict[str, list] = {n: [] for n in names}
        linear_input_stats(layer, data, i, mods, lambda n, x: xs[n].append(x))
        out = {}
        for n in names:
            # Statistics live on the CPU (checkpoints, the search) whatever device the layer runs on.
            x = torch.cat(xs.pop(n)).abs().cpu()
            if not torch.isfinite(x).all():
                raise CalibrationError(f"non-finite activations at the input of {n}")
            flat_idx = None
            if x.numel() > MAX_SCORE_SAMPLES:
                flat_idx = torch.randint(0, x.numel(), (MAX_SCORE_SAMPLES,), generator=self.gen)
            for mode in MODES:
                sc = x * channel_scale(mods[n], mode) if mode == "rsparse" else x
                sc = sc.reshape(-1) if flat_idx is None else sc.reshape(-1)[flat_idx]
                srt = sc.sort().values
                q = srt[(torch.linspace(0, 1, Q_POINTS, dtype=torch.float64) * (srt.numel() - 1)).round().long()]
                out[f"q:{mode}:{n}"] = q
                self.stats.quantiles[f"{mode}:{n}"] = q
        if self.grid:
            t0 = time.perf_counter()
            sub = _subset(data, self.greedy_tokens)
            ref = sub.forward(layer, i)
            for mode in self.modes:
                e = torch.zeros(len(names), len(self.grid))
                for j, n in enumerate(names):
                    for g, s in enumerate(self.grid):
                        if s == 0.0:
                            continue
                        rho = self.stats.rho_grid if mode == "rsparse" else 1.0
                        rel = n[len(prefix) + 1:]
                        with swapped(layer, {rel: make_linear(self.model, self.stats, self.svd, n, mode, s, rho)}):
                            y = sub.forward(layer, i)
                        e[j, g] = sum(float(((a - b) ** 2).sum()) for a, b in zip(y, ref))
                out[f"e:{mode}:{i}"] = e
                self.stats.errors[f"{mode}:{i}"] = e
            log.info("rsparse stats: layer %d block-error grid (%d linears x %d levels x %d modes, %d tokens) "
                     "in %.1fs", i, len(names), len(self.grid) - 1, len(self.modes),
                     sum(h.size(0) * h.size(1) for h in sub.hidden), time.perf_counter() - t0)
        return out

    def restore_layer(self, i, layer, tensors):
        for k, v in tensors.items():
            kind, rest = k.split(":", 1)
            (self.stats.quantiles if kind == "q" else self.stats.errors)[rest] = v


def _layer_prefix(model, i: int) -> str:
    return f"{compat.SUPPORTED_MODEL_TYPES[compat.text_config(model.config).model_type]}.{i}"


def _subset(data: LayerData, tokens: int) -> LayerData:
    hidden, have = [], 0
    for h in data.hidden:
        per = h.size(1)
        take = min(h.size(0), max(1, math.ceil((tokens - have) / per)))
        hidden.append(h[:take])
        have += take * per
        if have >= tokens:
            break
    return LayerData(hidden=hidden, layer_kwargs=data.layer_kwargs, chunk_sizes=[h.size(0) for h in hidden])


def target_names(model, cfg: RSparseConfig) -> tuple[list[str], dict, dict]:
    prefix = compat.SUPPORTED_MODEL_TYPES[compat.text_config(model.config).model_type]
    names, shapes, layer_of = [], {}, {}
    for n, lin in iter_linears(model, cfg.targets, cfg.ignore):
        names.append(n)
        shapes[n] = (lin.out_features, lin.in_features)
        layer_of[n] = int(n[len(prefix) + 1:].split(".")[0])
    return names, shapes, layer_of


def collect_stats(model, samples: torch.Tensor, cfg: RSparseConfig, *, greedy_modes=("rsparse",),
                  grid=GRID, greedy_tokens: int = 512, checkpoint_dir=None, progress: bool = True,
                  weights: str | None = None) -> RSparseStats:
    """One layer-sequential pass (resumable through `checkpoint_dir`). `weights`: the model's
    checkpoint.weights_digest when the caller has it (computed here once otherwise)."""
    check_model(model, [])
    names, shapes, layer_of = target_names(model, cfg)
    check_model(model, [(n, model.get_submodule(n)) for n in names])
    check_samples(model, samples)
    stats = RSparseStats(names, shapes, layer_of=layer_of, rho_grid=cfg.sparse_share if cfg.mode == "rsparse" else 0.95)
    method = _StatsMethod(model, stats, tuple(greedy_modes), tuple(grid) if greedy_modes else (), greedy_tokens)
    # The runner adds the model, the data and the accel version to this key.
    key = {"method": "rsparse-stats", "grid": list(grid), "modes": list(greedy_modes), "rho": stats.rho_grid,
           "greedy_tokens": greedy_tokens, "targets": cfg.targets, "ignore": cfg.ignore}
    if checkpoint_dir is not None and weights is None:
        weights = weights_digest(model)
    if not _load_complete(checkpoint_dir, checkpoint_key(model, samples, key, weights), method, model):
        run_layerwise(model, samples, method, checkpoint_dir=checkpoint_dir, run_key=key, progress=progress,
                      desc="rsparse stats", weights=weights)
    stats.grid = tuple(grid)
    return stats


def _load_complete(checkpoint_dir, key: dict, method: "_StatsMethod", model) -> bool:
    """A finished statistics pass with the same key is read back directly: the statistics do not
    change the model, so (unlike a resume mid-pass) no layer needs to be re-run."""
    if checkpoint_dir is None:
        return False
    ck = CheckpointDir.open(checkpoint_dir, key)
    tensors = [ck.load(i) for i in range(len(compat.decoder_layers(model)))]
    if any(t is None for t in tensors):
        return False
    for i, t in enumerate(tensors):
        method.restore_layer(i, None, t)
    log.info("rsparse statistics read from %s (complete pass)", ck.path)
    return True


def allocate(model, stats: RSparseStats, cfg: RSparseConfig, *, search: str | None = None,
             eval_samples: torch.Tensor | None = None, evo: EvoSettings | None = None,
             progress: bool = True, evo_state: dict | None = None, on_generation=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Per-linear (s, rho) in `stats.names` order, with parameter-weighted mean s == cfg.sparsity."""
    search = search or cfg.search
    n = stats.counts()
    L = len(stats.names)
    rho0 = torch.full((L,), cfg.sparse_share if cfg.mode == "rsparse" else 1.0, dtype=torch.float64)
    info: dict = {"search": search}
    if search == "uniform":
        return project_budget(torch.full((L,), cfg.sparsity, dtype=torch.float64), n, cfg.sparsity), rho0, info
    s = torch.zeros(L, dtype=torch.float64)
    for i in sorted(set(stats.layer_of.values())):
        idx = [j for j, nm in enumerate(stats.names) if stats.layer_of[nm] == i]
        key = f"{cfg.mode}:{i}"
        if key not in stats.errors:
            raise CalibrationError(f"no greedy statistics for mode {cfg.mode!r}; collect_stats(greedy_modes=...) "
                                   f"must include it")
        path = greedy_layer(stats.errors[key], stats.grid, n[idx])
        s[idx] = greedy_at(path, n[idx], cfg.sparsity)
    s = project_budget(s, n, cfg.sparsity)
    if search == "greedy":
        return s, rho0, info
    if search != "evo":
        raise ValueError(f"unknown search {search!r}")
    if eval_samples is None:
        raise CalibrationError("evolutionary search needs calibration samples for its objective")
    svd = stats.svd if stats.svd is not None else _SVDCache(model)
    stats.svd = svd

    def fitness(s_, rho_):
        return calibration_nll(model, stats, svd, cfg.mode, s_, rho_, eval_samples)

    s, rho, hist = evolutionary_search(s, rho0, n, cfg.sparsity, fitness, evo or EvoSettings(), progress,
                                       evo_state, on_generation)
    info["evo_history"] = hist
    return s, rho, info


@torch.inference_mode()
def calibration_nll(model, stats, svd, mode, s, rho, samples: torch.Tensor) -> float:
    mods = {nm: make_linear(model, stats, svd, nm, mode, float(s[j]), float(rho[j]))
            for j, nm in enumerate(stats.names)}
    with swapped(model, mods):
        logits = model(input_ids=samples, use_cache=False).logits
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), samples[:, 1:].flatten()))


def build_tensors(model, stats: RSparseStats, s: torch.Tensor, rho: torch.Tensor, mode: str) -> dict:
    svd = stats.svd if stats.svd is not None else _SVDCache(model)
    t = {}
    for j, nm in enumerate(stats.names):
        out_f, in_f = stats.shapes[nm]
        sj, rj = float(s[j]), float(rho[j])
        t[f"rsparse/{nm}.threshold"] = torch.tensor(stats.threshold(mode, nm, sj, rj), dtype=torch.float32)
        t[f"rsparse/{nm}.s_rho"] = torch.tensor([sj, rj], dtype=torch.float32)
        r = rank_for(in_f, out_f, sj, rj) if mode == "rsparse" else 0
        if r > 0:
            down, up = svd.factors(nm, r)
            t[f"rsparse/{nm}.down"], t[f"rsparse/{nm}.up"] = down, up
    return t


GREEDY_TOKENS = 512  # most tokens the greedy block-error grid uses (fewer if the calibration set is smaller)


def greedy_tokens_for(samples: torch.Tensor, greedy_tokens: int | None = None) -> int:
    """Tokens the greedy grid runs on: `greedy_tokens` (default GREEDY_TOKENS), at most the
    calibration set's, so the grid's cost follows the calibration set."""
    want = GREEDY_TOKENS if greedy_tokens is None else int(greedy_tokens)
    if want < 1:
        raise CalibrationError(f"rsparse: greedy_tokens must be >= 1, got {greedy_tokens!r}")
    return min(want, int(samples.numel()))


def calibrate_rsparse(model, tok, cfg: RSparseConfig, *, n_samples: int | None = None, seq_len: int | None = None,
                      seed: int | None = None, greedy_tokens: int | None = None, evo: EvoSettings | None = None,
                      eval_samples: int = 2, checkpoint_dir=None, progress: bool = True,
                      stats: RSparseStats | None = None):
    """Kept for existing callers; `accel.calibrate(model, cfg, ...)` is the entry. Draws the
    calibration samples (unset settings: registry.default_spec("rsparse")) and runs
    `calibrate_rsparse_model`. The model is left unchanged."""
    from accel.data import calibration_samples

    from .registry import default_spec

    spec = default_spec("rsparse", n_samples=n_samples, seq_len=seq_len, seed=seed)
    check_model(model, [])
    check_seq_len(model, spec.seq_len)
    samples = calibration_samples(tok, spec)
    return calibrate_rsparse_model(model, cfg, samples, spec=spec, checkpoint_dir=checkpoint_dir, progress=progress,
                                   greedy_tokens=greedy_tokens, evo=evo, eval_samples=eval_samples, stats=stats)


def _check(model, cfg: RSparseConfig) -> None:
    check_model(model, [])
    names = target_names(model, cfg)[0]
    check_model(model, [(n, model.get_submodule(n)) for n in names])


@register_calibrator("rsparse", check=_check)
def calibrate_rsparse_model(model, config: RSparseConfig, samples: torch.Tensor, *, spec, checkpoint_dir=None,
                            progress: bool = True, greedy_tokens: int | None = None, evo: EvoSettings | None = None,
                            eval_samples: int = 2, stats: RSparseStats | None = None):
    """registry.py's calling shape. Returns an in-memory `Artifact`; the model is left unchanged
    (statistics are read on the dense model, candidate linears are swapped in temporarily).

    checkpoint_dir: the statistics pass checkpoints per layer under `stats/` there and the
    evolutionary search per generation, so an interrupted run resumes. greedy_tokens: see
    greedy_tokens_for. `stats` reuses a previous pass (sweeps).
    """
    import json
    from pathlib import Path

    from accel.artifact import Artifact

    cfg = config
    check_model(model, [])
    check_samples(model, samples)
    greedy_tokens = greedy_tokens_for(samples, greedy_tokens)
    weights = None
    if checkpoint_dir:
        # Before any work: the directory must hold only what an R-Sparse run writes there.
        refuse_foreign_top(checkpoint_dir)
        # One hash of every weight keys both the statistics pass and the search state.
        weights = weights_digest(model)
    if stats is None:
        greedy_modes = (cfg.mode,) if cfg.search != "uniform" else ()
        stats = collect_stats(model, samples, cfg, greedy_modes=greedy_modes, greedy_tokens=greedy_tokens,
                              checkpoint_dir=Path(checkpoint_dir) / "stats" if checkpoint_dir else None,
                              progress=progress, weights=weights)
    evo_state, on_gen = None, None
    if cfg.search == "evo" and checkpoint_dir:
        import dataclasses
        import hashlib

        evo_path = Path(checkpoint_dir) / f"evo_{cfg.mode}_{cfg.sparsity:.4f}_{cfg.sparse_share:.4f}.json"
        # A saved generation is only valid for the same model, data, config and search settings.
        ek = checkpoint_key(model, samples, {"config": cfg.to_dict(), "evo": dataclasses.asdict(evo or EvoSettings()),
                                             "eval_samples": eval_samples, "greedy_tokens": greedy_tokens}, weights)
        digest = hashlib.sha256(json.dumps(ek, sort_keys=True).encode()).hexdigest()
        try:
            evo_state = json.loads(evo_path.read_text()) if evo_path.is_file() else None
        except (OSError, ValueError) as e:
            log.warning("evolutionary search state %s is unreadable (%s); starting the search afresh", evo_path, e)
            evo_state = None
        if evo_state is not None and (not isinstance(evo_state, dict) or evo_state.get("accel_key") != digest):
            log.warning("evolutionary search state %s was saved by a run with a different model, data or "
                        "settings; starting the search afresh", evo_path)
            evo_state = None

        def on_gen(st):
            tmp = evo_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({**st, "accel_key": digest}))
            tmp.replace(evo_path)
    s, rho, info = allocate(model, stats, cfg, eval_samples=samples[:eval_samples], evo=evo, progress=progress,
                            evo_state=evo_state, on_generation=on_gen)
    tensors = build_tensors(model, stats, s, rho, cfg.mode)
    n = stats.counts()
    info.update(budget=float((s * n).sum() / n.sum()), linears=len(stats.names),
                mean_rho=float((rho * n).sum() / n.sum()), greedy_tokens=greedy_tokens,
                protocol="thresholds from dense upstream activations; every token sparsified at run time")
    return Artifact.for_model(model, [cfg], tensors, calibration={**spec.to_dict(), **info})
