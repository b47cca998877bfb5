"""`accel eval rsparse-sweep` and `accel bench rsparse-linear`: shims over eval.sweep_rsparse / bench_rsparse."""
from __future__ import annotations


def _cmd_sweep(args) -> int:
    from accel.calibrate.rsparse_cli import evo_settings
    from accel.cli import emit

    from .sweep_rsparse import format_table, run_sweep

    levels = [float(v) for v in args.levels.split(",")]
    r = run_sweep(args.model, levels, max_tokens=args.max_tokens, seq_len=args.seq_len, search=args.search,
                  n_samples=args.num_calibration_samples, greedy_tokens=args.greedy_tokens, evo=evo_settings(args),
                  sparse_share=args.sparse_share, checkpoint_dir=args.checkpoint_dir, progress=not args.json,
                  dense=not args.no_dense, rows=tuple(args.rows.split(",")))
    emit(r, args.json, format_table(r))
    return 0


def _cmd_bench(args) -> int:
    from accel.cli import emit

    from .bench_rsparse import bench_rsparse, format_bench

    r = bench_rsparse(sparsity=args.sparsity, decode_tokens=args.decode_tokens, repeats=args.repeats,
                      dtype=args.dtype, artifact=args.artifact)
    emit(r, args.json, format_bench(r))
    return 0


def register(cli) -> None:
    from accel.cli import add_sweep_calibration_args

    from accel.calibrate.rsparse_cli import add_search_args

    s = cli.add("eval", "rsparse-sweep", "perplexity of dense / TEAL / R-Sparse uniform / R-Sparse searched")
    s.add_argument("--model", default="smollm2-135m")
    add_sweep_calibration_args(s, n_samples=8)
    s.add_argument("--seq-len", type=int, default=512, help="tokens per calibration and evaluation window")
    add_search_args(s)
    s.add_argument("--levels", default="0.4,0.5,0.6", help="model-level sparsity budgets (columns)")
    s.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens")
    s.add_argument("--search", default="greedy", choices=["greedy", "evo"], help="search for the 'searched' row")
    s.add_argument("--sparse-share", type=float, default=0.95, help="uniform rho (sparse share of the budget)")
    s.add_argument("--checkpoint-dir", default=None, help="reuse/resume the statistics pass here")
    s.add_argument("--rows", default="teal,uniform,searched", help="which rows besides dense")
    s.add_argument("--no-dense", action="store_true", help="skip the dense row (e.g. one level per process)")
    s.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
    s.set_defaults(func=_cmd_sweep)

    b = cli.add("bench", "rsparse-linear", "CPU speed of an R-Sparse linear vs dense F.linear (1 thread)")
    b.add_argument("--sparsity", type=float, default=0.5)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    b.add_argument("--repeats", type=int, default=40)
    b.add_argument("--decode-tokens", type=int, default=32, help="tokens generated in the end-to-end decode")
    b.add_argument("--artifact", default=None, help="SmolLM2 R-Sparse artifact for end-to-end decode "
                                                    "(default: a uniform one calibrated on the fly)")
    b.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
    b.set_defaults(func=_cmd_bench)
