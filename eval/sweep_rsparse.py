"""`accel eval rsparse-sweep`: dense vs TEAL-style vs R-Sparse (uniform rho) vs R-Sparse (searched).

Protocol: one statistics pass on the calibration split (dense upstream activations) serves every
level and method; each row is patched in and evaluated on the evaluation split with every token
sparsified (prefill included), windows of `seq_len`.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def run_sweep(model_name: str = "smollm2-135m", levels=(0.4, 0.5, 0.6), *, max_tokens: int = 16384,
              seq_len: int = 512, search: str = "greedy", n_samples: int = 8, greedy_tokens: int = 512,
              evo=None, sparse_share: float = 0.95, checkpoint_dir=None, progress: bool = True,
              dense: bool = True, rows=("teal", "uniform", "searched")) -> dict:
    from pathlib import Path

    import accel
    from accel.configs.rsparse import RSparseConfig, teal_config
    from accel.data import CalibrationSpec, calibration_samples, eval_tokens
    from accel.eval.perplexity import perplexity

    from accel.calibrate.rsparse import calibrate_rsparse, collect_stats

    t0 = time.perf_counter()
    model, tok = accel.models.load(model_name)
    ids = eval_tokens(tok, "wiki", max_tokens)
    dense_ppl = perplexity(model, ids, seq_len=seq_len, progress=progress, desc="dense").ppl if dense else None
    samples = calibration_samples(tok, CalibrationSpec(n_samples=n_samples, seq_len=seq_len))
    ck = Path(checkpoint_dir) if checkpoint_dir else None
    base = RSparseConfig(sparsity=0.5, sparse_share=sparse_share, search="greedy")
    stats = collect_stats(model, samples, base, greedy_modes=("rsparse",), greedy_tokens=greedy_tokens,
                          checkpoint_dir=ck / "stats" if ck else None, progress=progress)
    table = []
    for s in levels:
        cfgs = {"teal": teal_config(s), "rsparse-uniform": RSparseConfig(s, sparse_share, search="uniform"),
                f"rsparse-{search}": RSparseConfig(s, sparse_share, search=search)}
        cfgs = {k: v for k, v in cfgs.items() if k.split("-")[-1] in rows or k in rows
                or ("searched" in rows and k == f"rsparse-{search}")}
        row = {"sparsity": s}
        for label, cfg in cfgs.items():
            art = calibrate_rsparse(model, tok, cfg, n_samples=n_samples, seq_len=seq_len, evo=evo,
                                    greedy_tokens=greedy_tokens, stats=stats, progress=progress,
                                    checkpoint_dir=ck)
            with accel.patched(model, art):
                r = perplexity(model, ids, seq_len=seq_len, progress=progress, desc=f"{label}@{s}")
            row[label] = r.ppl
            log.info("sparsity %.2f %s: ppl %.3f (budget %.4f)", s, label, r.ppl, art.calibration["budget"])
        table.append(row)
    n_tok = (ids.numel() // seq_len) * (seq_len - 1)
    return {"model": model_name, "tokens": n_tok, "seq_len": seq_len, "dense": dense_ppl, "rows": table,
            "search": search, "sparse_share": sparse_share, "calibration_tokens": n_samples * seq_len,
            "protocol": "every token sparsified (prefill included); thresholds from dense upstream activations",
            "seconds": time.perf_counter() - t0}


def format_table(r: dict) -> str:
    keys = [k for k in r["rows"][0] if k != "sparsity"]
    lines = [f"{r['model']}: perplexity over {r['tokens']} tokens (windows of {r['seq_len']}), "
             f"every token sparsified; dense {r['dense'] if r['dense'] is None else round(r['dense'], 3)}",
             "| sparsity | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in r["rows"]:
        lines.append(f"| {row['sparsity']:.0%} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def demo_step(model, tok, ids, seq_len: int = 512, sparsity: float = 0.5) -> dict:
    """`accel demo` step: a small uniform R-Sparse calibration (2 windows), patched perplexity."""
    import accel
    from accel.configs.rsparse import RSparseConfig
    from accel.eval.perplexity import perplexity

    from accel.calibrate.rsparse import calibrate_rsparse

    t0 = time.perf_counter()
    art = calibrate_rsparse(model, tok, RSparseConfig(sparsity, 0.95, search="uniform"), n_samples=2,
                            progress=False)
    with accel.patched(model, art):
        r = perplexity(model, ids, seq_len=seq_len, desc="rsparse ppl")
    print(f"[rsparse] uniform {sparsity:.0%} activation sparsity (rho 0.95, every token sparsified): "
          f"ppl {r.ppl:.3f} ({time.perf_counter() - t0:.0f}s incl. calibration)")
    return {"rsparse_ppl": r.ppl}
