"""`accel eval prune-sweep`: shim over eval.sweep_prune."""
from __future__ import annotations


def _cmd_sweep(args) -> int:
    from accel.cli import emit

    from accel.artifact import check_output_path

    from .sweep_prune import format_table, plot, prune_sweep

    if args.plot:  # fail fast, before the sweep
        check_output_path(args.plot, args.overwrite, "file")
    cols = [c.strip() for c in args.sparsities.split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    r = prune_sweep(args.model, cols, methods, args.max_tokens, args.seq_len, args.num_calibration_samples, args.max_seq_length,
                    args.seed, args.dtype, args.batch_size, progress=not args.json,
                    fp32_check=not args.no_fp32_check, dense=not args.no_dense)
    meta = r["meta"]
    fwd = meta["forward_seconds"]
    times = ", ".join(f"{k} {v:.0f}s ({v / fwd:.2f}x)" for k, v in meta["calibrate_seconds"].items())
    text = (format_table(r["table"], cols)
            + f"\n\nppl over {meta['eval_tokens']} eval tokens (windows of {meta['seq_len']}, {meta['dtype']}); "
            f"calibration {meta['calibration']['n_samples']}x{meta['calibration']['seq_len']} tokens of the "
            f"calibration split, {meta['dtype']}.")
    if "dense_fp32" in meta and "dense" in r["table"]:
        text += f"\ndense fp32 ppl {meta['dense_fp32']:.4f} vs {meta['dtype']} {r['table']['dense']:.4f}"
    text += f"\ncalibration time vs one plain forward over the calibration set ({fwd:.1f}s): {times}"
    if args.plot:
        plot(r["table"], cols, args.plot, overwrite=args.overwrite)
        text += f"\nplot -> {args.plot}"
    emit(r["table"], args.json, text)
    return 0


def register(cli) -> None:
    from accel.cli import add_overwrite, add_sweep_calibration_args

    s = cli.add("eval", "prune-sweep", "perplexity table: dense / magnitude / wanda / wanda+dsnot x sparsities")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--sparsities", default="0.5,0.6,0.7,2:4,4:8", help="columns: sparsities and N:M patterns")
    s.add_argument("--methods", default="magnitude,wanda,wanda+dsnot",
                   help="rows; a DSnoT objective may follow, e.g. wanda+dsnot:mean,wanda+dsnot:mse")
    s.add_argument("--max-tokens", type=int, default=16384)
    s.add_argument("--seq-len", type=int, default=512)
    add_sweep_calibration_args(s, n_samples=16, seq_len=512)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="calibration and evaluation dtype (dense fp32 ppl is printed beside it)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--no-fp32-check", action="store_true", help="skip the dense fp32 perplexity")
    s.add_argument("--no-dense", action="store_true", help="skip the dense row (split a sweep over processes)")
    s.add_argument("--plot", default=None, help="write ppl-vs-sparsity PNG here")
    add_overwrite(s)
    s.add_argument("--json", action="store_true", help="last line: {row: {column: ppl}}")
    s.set_defaults(func=_cmd_sweep)
