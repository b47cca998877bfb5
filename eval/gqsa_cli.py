"""`accel eval gqsa-sweep` and `accel bench gqsa-gemv`: thin shims over eval.sweep_gqsa / bench_gqsa."""
from __future__ import annotations

import json


def _cmd_sweep(args) -> int:
    import torch

    from accel.cli import emit

    from .sweep_gqsa import gqsa_sweep

    if args.threads:
        torch.set_num_threads(args.threads)

    def show(r):
        ppls = "  ".join(f"{k} {v:9.3f}" for k, v in r["ppl_sources"].items())
        print(f"{r['row']:<24} ppl {ppls}  [{r['grid']}]  calib {r['calib_seconds']}s", flush=True)
        if args.partial:
            with open(args.partial, "a") as f:
                f.write(json.dumps(r) + "\n")
    res = gqsa_sweep(args.rows.split(","), args.model, args.max_tokens, args.seq_len, args.num_calibration_samples,
                     args.max_seq_length, args.bqpo_steps, args.bqpo_batch, args.bqpo_lr, args.e2e_steps,
                     args.e2e_lr, progress=not args.json, on_row=show, eval_dtype=args.eval_dtype, seed=args.seed,
                     sources=[c for c in args.sources.split(",") if c])
    emit(res, args.json, f"{res['tokens']} tokens x seq {res['seq_len']}, calibration {res['calibration']}")
    return 0


def _cmd_bench(args) -> int:
    import torch

    from accel.cli import emit

    from .bench_gqsa import bench_decode, bench_gemv

    torch.set_num_threads(1)
    rows = bench_gemv(group_size=args.group_size, tile_rows=args.tile_rows, rounds=args.rounds)
    for r in rows:
        print(f"{r['in']:>5}->{r['out']:<5} B={r['batch']}  bf16 {r['ms_bf16']:.3f} ms  int4 {r['ms_int4']:.3f} ms  "
              f"gqsa {r['ms_gqsa']:.3f} ms  x{r['speedup_vs_bf16']:.2f} vs bf16  x{r['speedup_vs_int4']:.2f} vs int4  "
              f"bytes {r['bytes_ratio']:.3f}x bf16  ({r['path']})", flush=True)
    for r in rows:
        if "layouts_vs_int4_b1" in r:
            print(f"  {r['in']}->{r['out']} B=1 speed vs dense int4 by layout: "
                  + ", ".join(f"{k} x{v:.2f}" for k, v in r["layouts_vs_int4_b1"].items()), flush=True)
    head = next(r for r in rows if r["in"] == 4096 and r["batch"] == 1)
    res = {"threads": 1, "group_size": args.group_size, "tile_rows": args.tile_rows, "path": head["path"], "rows": rows,
           "speedup_vs_bf16": head["speedup_vs_bf16"], "speedup_vs_int4": head["speedup_vs_int4"],
           "bytes_ratio": head["bytes_ratio"]}
    if not args.no_decode:
        d = bench_decode(group_size=args.group_size, tile_rows=args.tile_rows, new_tokens=args.new_tokens)
        print(f"decode SmolLM2 bf16: dense {d['dense_bf16_tok_s']:.1f} tok/s, GQSA W4S50 {d['gqsa_tok_s']:.1f} tok/s "
              f"(x{d['speedup']:.2f}; {d['note']})", flush=True)
        res["decode"] = d
    emit(res, args.json)
    return 0


def register(cli) -> None:
    from accel.cli import add_sweep_calibration_args

    from .sweep_gqsa import ROWS

    p = cli.add("eval", "gqsa-sweep", "SmolLM2 perplexity: dense, RTN W4/W2, Wanda 2:4, GQSA rows")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list from {', '.join(ROWS)}")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512)
    add_sweep_calibration_args(p, n_samples=32, seq_len=512, old_samples=("--samples", "--n-samples"))
    p.add_argument("--bqpo-steps", type=int, default=8)
    p.add_argument("--bqpo-batch", type=int, default=2)
    p.add_argument("--bqpo-lr", type=float, default=3e-4)
    p.add_argument("--e2e-steps", type=int, default=8)
    p.add_argument("--e2e-lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0, help="calibration sample seed (the same samples for every row)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--sources", default="wiki",
                   help="comma list of evaluation corpora (wiki, shakespeare, ...); each row is measured on each")
    p.add_argument("--partial", default=None, help="append each row as a JSON line to this file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_sweep)

    b = cli.add("bench", "gqsa-gemv", "GQSA W4S50 CPU GEMV vs dense bf16 and dense int4; decode tok/s")
    b.add_argument("--group-size", type=int, default=16,
                   help="the native kernel takes 16 or a multiple of 32; torch's int4 kernel a multiple of 32")
    b.add_argument("--tile-rows", type=int, default=1, help="1: per-row layout (the calibration default)")
    b.add_argument("--rounds", type=int, default=7)
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--no-decode", action="store_true")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_bench)
