"""Perplexity of pruned SmolLM2 across methods and sparsities (`accel eval prune-sweep`).

Rows: dense, magnitude, wanda, wanda+dsnot. Columns: unstructured sparsities ("0.5") and N:M
patterns ("2:4"). Calibration uses the calibration split, perplexity the disjoint evaluation split.
One model is loaded; dense perplexity is measured in fp32 and in `dtype`, then each cell restores the
dense weights, calibrates and evaluates in `dtype` (bf16 by default, as the papers use fp16).
"""
from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)

DEFAULT_COLUMNS = ("0.5", "0.6", "0.7", "2:4", "4:8")
DEFAULT_METHODS = ("magnitude", "wanda", "wanda+dsnot")


def config_for(method: str, column: str):
    from accel.configs.prune import PruneConfig

    init, _, extra = method.partition("+")
    extra, _, objective = extra.partition(":")
    if extra not in ("", "dsnot") or (objective and not extra):
        raise ValueError(f"unknown sweep method {method!r}; use magnitude, wanda, magnitude+dsnot or "
                         "wanda+dsnot, optionally with a DSnoT objective (wanda+dsnot:mean)")
    kw = {"dsnot_objective": objective} if objective else {}
    if ":" in column:
        return PruneConfig(init=init, sparsity=None, pattern=column, dsnot=bool(extra), **kw)
    return PruneConfig(init=init, sparsity=float(column), dsnot=bool(extra), **kw)


def prune_sweep(model_name: str = "smollm2-135m", columns=DEFAULT_COLUMNS, methods=DEFAULT_METHODS,
                max_tokens: int = 16384, seq_len: int = 512, n_samples: int = 16, calib_seq_len: int = 512,
                seed: int = 0, dtype: str = "bfloat16", batch_size: int = 8,
                progress: bool = True, fp32_check: bool = True,
                 dense: bool = True) -> dict:
    """Returns {"table": {row: ppl or {column: ppl}}, "meta": {...timings, fp32 check...}}."""
    import accel
    from accel.calibrate.prune import prune_model, time_forward
    from accel.data import CalibrationSpec, calibration_samples, eval_tokens

    from .perplexity import perplexity

    cfgs = {(m, c): config_for(m, c) for m in methods for c in columns}  # validates before any work
    model, tok = accel.models.load(model_name, dtype=torch.float32)
    ids = eval_tokens(tok, "wiki", max_tokens)
    spec = CalibrationSpec(n_samples=n_samples, seq_len=calib_seq_len, seed=seed)
    samples = calibration_samples(tok, spec)
    meta: dict = {"eval_tokens": int(ids.numel()), "seq_len": seq_len, "dtype": dtype,
                  "calibration": spec.to_dict(), "calibrate_seconds": {}, "forward_seconds": None}
    if dtype != "float32" and fp32_check:
        meta["dense_fp32"] = perplexity(model, ids, seq_len=seq_len, progress=progress, desc="dense fp32").ppl
    # Calibration and evaluation both run in `dtype` (the papers calibrate fp16 models).
    model.to(getattr(torch, dtype))
    dense_sd = {k: v.clone() for k, v in model.state_dict().items()}

    def ppl(desc: str) -> float:
        return perplexity(model, ids, seq_len=seq_len, progress=progress, desc=desc).ppl

    fwd = time_forward(model, samples, batch_size)
    meta["forward_seconds"] = fwd
    table: dict = {"dense": ppl("dense")} if dense else {}
    for m in methods:
        table[m] = {}
    # Column by column, so that an interrupted sweep still has complete columns in its log.
    for c in columns:
        for m in methods:
            model.load_state_dict(dense_sd)
            t0 = time.perf_counter()
            prune_model(model, cfgs[(m, c)], samples, batch_size=batch_size, progress=progress)
            dt = time.perf_counter() - t0
            meta["calibrate_seconds"][f"{m}@{c}"] = dt
            table[m][c] = ppl(f"{m} {c}")
            log.info("%s %s: ppl %.3f (calibration %.1fs = %.2fx forward)", m, c, table[m][c], dt, dt / fwd)
    model.load_state_dict(dense_sd)
    return {"table": table, "meta": meta}


def format_table(table: dict, columns) -> str:
    head = f"{'method':<14}" + "".join(f"{c:>11}" for c in columns)
    lines = [head, "-" * len(head)]
    for row, vals in table.items():
        if isinstance(vals, dict):
            lines.append(f"{row:<14}" + "".join(f"{vals.get(c, float('nan')):>11.2f}" for c in columns))
        else:
            lines.append(f"{row:<14}" + f"{vals:>11.2f}" * len(columns))
    return "\n".join(lines)


def plot(table: dict, columns, path: str, overwrite: bool = False) -> None:
    """Perplexity (log) against sparsity: one line per method over the unstructured columns; N:M
    columns are marked at their sparsity N/M and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (row, vals) in enumerate(table.items()):
        color = f"C{i}"
        if not isinstance(vals, dict):
            ax.axhline(vals, color=color, ls="--", label=f"{row} ({vals:.2f})")
            continue
        uns = [(float(c), v) for c, v in vals.items() if ":" not in c]
        if uns:
            xs, ys = zip(*sorted(uns))
            ax.plot(xs, ys, "o-", color=color, label=row)
        for c, v in vals.items():
            if ":" in c:
                n, m = map(int, c.split(":"))
                ax.plot([n / m], [v], "s", color=color, mfc="none")
                ax.annotate(c, (n / m, v), textcoords="offset points", xytext=(5, 0), fontsize=7, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (squares: N:M patterns)")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("SmolLM2-135M pruning, wiki eval split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from accel.artifact import save_figure

    save_figure(fig, path, overwrite)


def demo_step(model, tok, ids: torch.Tensor, seq_len: int = 512, sparsity: float = 0.5) -> dict:
    """README demo: calibrate Wanda on 8x256 calibration tokens (on a copy), save the artifact,
    patch `model` with it, print its perplexity, unpatch. ~1-2 min on CPU."""
    import copy
    import tempfile

    import accel
    from accel.calibrate.prune import build_artifact, prune_model
    from accel.configs.prune import PruneConfig
    from accel.data import calibration_samples

    from .perplexity import perplexity

    cfg = PruneConfig(init="wanda", sparsity=sparsity)
    work = copy.deepcopy(model)
    samples = calibration_samples(tok, n_samples=8, seq_len=256)
    info = prune_model(work, cfg, samples, progress=False)
    with tempfile.TemporaryDirectory() as d:
        build_artifact(work, cfg, info, {"model": getattr(model.config, "accel_source", None)}).save(f"{d}/wanda")
        del work
        with accel.patched(model, f"{d}/wanda"):
            r = perplexity(model, ids, seq_len=seq_len, desc="wanda ppl")
    print(f"[wanda] {sparsity:.0%} unstructured (8x256 calibration tokens, {info.seconds:.0f}s; dense-masked "
          f"kernel on CPU): ppl {r.ppl:.3f}")
    return {"wanda_sparsity": sparsity, "wanda_ppl": r.ppl, "wanda_calibration_seconds": info.seconds}
