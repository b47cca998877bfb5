"""`accel calibrate rsparse`, `accel eval rsparse-sweep`, `accel bench rsparse-linear`."""
from __future__ import annotations

import argparse


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--n-samples", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--greedy-tokens", type=int, default=512, help="tokens for the greedy block-error grid")
    p.add_argument("--population", type=int, default=6, help="evolutionary search population")
    p.add_argument("--generations", type=int, default=4, help="evolutionary search generations")
    p.add_argument("--json", action="store_true", help="last stdout line is a JSON object")


def _evo(args):
    from .rsparse_search import EvoSettings
    return EvoSettings(population=args.population, generations=args.generations)


def _cmd_calibrate(args) -> int:
    import accel
    from accel.cli import check_output, emit
    from accel.configs.rsparse import RSparseConfig

    from .rsparse import calibrate_rsparse

    check_output(args)  # before the calibration, not after
    rho = 1.0 if args.mode == "teal" else args.sparse_share
    cfg = RSparseConfig(sparsity=args.sparsity, sparse_share=rho, mode=args.mode, search=args.search)
    model, tok = accel.models.load(args.model, dtype=args.dtype)
    ck = args.checkpoint_dir or f"{args.output.rstrip('/')}.ckpt"
    art = calibrate_rsparse(model, tok, cfg, n_samples=args.n_samples, seq_len=args.seq_len,
                            greedy_tokens=args.greedy_tokens, evo=_evo(args), checkpoint_dir=ck,
                            progress=not args.json)
    path = art.save(args.output, overwrite=args.overwrite)
    c = art.calibration
    emit({"artifact": str(path), "model": args.model, **cfg.to_dict()["params"], "budget": c["budget"],
          "mean_rho": c["mean_rho"], "evo_history": c.get("evo_history")}, args.json,
         f"wrote {path}: {cfg.mode} search={cfg.search} budget={c['budget']:.4f} mean rho={c['mean_rho']:.3f} "
         f"over {c['linears']} linears")
    return 0


def _cmd_sweep(args) -> int:
    from accel.cli import emit

    from accel.eval.sweep_rsparse import format_table, run_sweep

    levels = [float(v) for v in args.levels.split(",")]
    r = run_sweep(args.model, levels, max_tokens=args.max_tokens, seq_len=args.seq_len, search=args.search,
                  n_samples=args.n_samples, greedy_tokens=args.greedy_tokens, evo=_evo(args),
                  sparse_share=args.sparse_share, checkpoint_dir=args.checkpoint_dir, progress=not args.json,
                  dense=not args.no_dense, rows=tuple(args.rows.split(",")))
    emit(r, args.json, format_table(r))
    return 0


def _cmd_bench(args) -> int:
    from accel.cli import emit

    from accel.eval.bench_rsparse import bench_rsparse, format_bench

    r = bench_rsparse(sparsity=args.sparsity, decode_tokens=args.decode_tokens, repeats=args.repeats,
                      dtype=args.dtype, artifact=args.artifact)
    emit(r, args.json, format_bench(r))
    return 0


def register(cli) -> None:
    from accel.cli import add_overwrite

    p = cli.add("calibrate", "rsparse", "R-Sparse (sparse + low-rank) or TEAL-style activation sparsity")
    _add_common(p)
    p.add_argument("--sparsity", type=float, default=0.5, help="model-level budget in [0, 1)")
    p.add_argument("--search", default="greedy", choices=["greedy", "evo", "uniform"])
    p.add_argument("--mode", default="rsparse", choices=["rsparse", "teal"])
    p.add_argument("--sparse-share", type=float, default=0.95, help="uniform rho (sparse share of the budget)")
    p.add_argument("--output", required=True)
    add_overwrite(p)
    p.add_argument("--checkpoint-dir", default=None, help="resume directory (default OUTPUT.ckpt)")
    p.set_defaults(func=_cmd_calibrate)

    s = cli.add("eval", "rsparse-sweep", "perplexity of dense / TEAL / R-Sparse uniform / R-Sparse searched")
    _add_common(s)
    s.add_argument("--levels", default="0.4,0.5,0.6")
    s.add_argument("--max-tokens", type=int, default=16384)
    s.add_argument("--search", default="greedy", choices=["greedy", "evo"], help="search for the 'searched' row")
    s.add_argument("--sparse-share", type=float, default=0.95)
    s.add_argument("--checkpoint-dir", default=None, help="reuse/resume the statistics pass here")
    s.add_argument("--rows", default="teal,uniform,searched", help="which rows besides dense")
    s.add_argument("--no-dense", action="store_true", help="skip the dense row (e.g. one level per process)")
    s.set_defaults(func=_cmd_sweep)

    b = cli.add("bench", "rsparse-linear", "CPU speed of an R-Sparse linear vs dense F.linear (1 thread)")
    b.add_argument("--sparsity", type=float, default=0.5)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    b.add_argument("--repeats", type=int, default=40)
    b.add_argument("--decode-tokens", type=int, default=32, help="tokens generated in the end-to-end decode")
    b.add_argument("--artifact", default=None, help="SmolLM2 R-Sparse artifact for end-to-end decode "
                                                    "(default: a uniform one calibrated on the fly)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_bench)
