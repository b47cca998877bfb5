"""CLI shims: `accel calibrate wanda|dsnot|magnitude`, `accel export --format hf`, `accel eval prune-sweep`."""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def calibrate_prune(output: str, init: str = "wanda", dsnot: bool = False, model_name: str = "smollm2-135m",
                    sparsity: float | None = 0.5, pattern: str = "unstructured", use_variant: bool = False,
                    n_samples: int = 128, seq_len: int = 512, seed: int = 0, max_cycles: int = 50,
                    threshold: float = 0.1, objective: str | None = None, targets: list[str] | None = None,
                    ignore: list[str] | None = None,
                    batch_size: int = 8, dtype: str = "float32", progress: bool = True,
                    model=None, tokenizer=None, samples=None, mode: str = "auto", overwrite: bool = False) -> dict:
    """Calibrate and save a prune artifact at `output`. Every input is checked before anything is
    written; per-layer checkpoints go to `<output>.partial/` (resumed by re-running the same
    command) and are removed once the artifact is saved. `model`/`tokenizer`/`samples` ([N, L])
    replace loading `model_name` and sampling the calibration split (tests, notebooks).
    overwrite: replace an existing artifact at `output` (anything else there is always refused)."""
    from accel.artifact import check_output_path
    from accel.configs.prune import PruneConfig
    from accel.data import CalibrationSpec, calibration_samples

    import torch

    from .checkpoint import remove_checkpoints
    from .prune import build_artifact, load_source, prune_model, selected_linears, time_forward
    from .runner import CalibrationError, check_model, check_seq_len

    extra = {} if objective is None else {"dsnot_objective": objective}
    cfg = PruneConfig(init=init, dsnot=dsnot, sparsity=sparsity, pattern=pattern, use_variant=use_variant,
                      max_cycles=max_cycles, threshold=threshold, targets=targets, ignore=list(ignore or []), **extra)
    # Fail before loading or calibrating anything: the output and its checkpoint directory.
    out = check_output_path(output, overwrite, "artifact")
    partial = out.with_name(out.name + ".partial")
    if partial.exists() and not partial.is_dir():
        raise CalibrationError(f"{partial} (the checkpoint directory of {out}) is an existing file; "
                               f"move it or choose another output")
    if model is None:
        model, tokenizer = load_source(model_name, getattr(torch, dtype))
    check_model(model, [])
    check_model(model, selected_linears(model, cfg))
    spec = CalibrationSpec(n_samples=n_samples, seq_len=seq_len, seed=seed)
    if samples is not None:
        spec = CalibrationSpec(source="given", n_samples=samples.size(0), seq_len=samples.size(-1), seed=seed)
    elif cfg.needs_data:
        check_seq_len(model, seq_len)
        samples = calibration_samples(tokenizer, spec)
    if not cfg.needs_data:
        samples = None
    existed = partial.exists()
    # CPU time beside wall time: on a shared machine the wall-clock ratio drifts with the load.
    cpu0 = time.process_time()
    try:
        info = prune_model(model, cfg, samples, batch_size=batch_size,
                           checkpoint_dir=partial if samples is not None else None, progress=progress,
                           mode=mode)
    except CalibrationError:
        # Bad data (NaN activations...): a resume could not help, so leave nothing behind.
        if not existed:
            remove_checkpoints(partial)
        raise
    cpu_cal = time.process_time() - cpu0
    cpu0 = time.process_time()
    fwd = time_forward(model, samples, batch_size) if samples is not None else None
    cpu_fwd = time.process_time() - cpu0
    nz = sum(int(k.sum()) for k in info.masks.values())
    tot = sum(k.numel() for k in info.masks.values())
    calib = {"model": model_name, "dtype": dtype, "data": spec.to_dict() if samples is not None else None,
             "seconds": info.seconds, "forward_seconds": fwd,
             "time_ratio": info.seconds / fwd if fwd else None,
             "cpu_seconds": cpu_cal, "forward_cpu_seconds": cpu_fwd,
             "cpu_time_ratio": cpu_cal / cpu_fwd if fwd else None,
             "peak_rss_mb": info.run.peak_rss_mb if info.run else None,
             "activation_mb": info.run.activation_mb if info.run else None,
             "resumed_layers": info.run.resumed_layers if info.run else 0,
             "mode": info.mode, "dsnot_swaps": info.dsnot_swaps, "sparsity_measured": 1 - nz / tot, "linears": len(info.masks)}
    build_artifact(model, cfg, info, calib).save(out, overwrite=overwrite)
    remove_checkpoints(partial)
    return {"output": str(out), "method": cfg.label, "pattern": cfg.pattern, "sparsity": cfg.sparsity, **calib}


def _targets(s: str | None) -> list[str] | None:
    return [t for t in s.split(",") if t] if s else None


def _cmd_calibrate(args) -> int:
    from accel.cli import emit

    init = args.init if args.prune_kind == "dsnot" else args.prune_kind
    sparsity = args.sparsity
    if sparsity is None and args.pattern in (None, "unstructured"):
        sparsity = 0.5
    t0 = time.perf_counter()
    r = calibrate_prune(args.output, init=init, dsnot=args.prune_kind == "dsnot", model_name=args.model,
                        sparsity=sparsity, pattern=args.pattern or "unstructured", use_variant=args.use_variant,
                        n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
                        max_cycles=args.max_cycles, threshold=args.threshold, objective=args.objective,
                        targets=_targets(args.targets),
                        ignore=_targets(args.ignore) or [], batch_size=args.batch_size, dtype=args.dtype,
                        progress=not args.json, mode=args.mode, overwrite=args.overwrite)
    ratio = (f"({r['mode']}) {r['seconds']:.1f}s = {r['time_ratio']:.2f}x one plain forward over the same "
             f"{args.n_samples}x{args.seq_len} calibration set ({r['forward_seconds']:.1f}s); CPU time "
             f"{r['cpu_seconds']:.1f}s = {r['cpu_time_ratio']:.2f}x ({r['forward_cpu_seconds']:.1f}s)"
             if r["time_ratio"] else f"{r['seconds']:.2f}s (no calibration data needed)")
    mem = (f"peak RSS {r['peak_rss_mb']:.0f} MB, layer activations {r['activation_mb']:.0f} MB"
           if r["peak_rss_mb"] else "")
    emit(r, args.json, f"{r['method']} {r['pattern']} sparsity {r['sparsity_measured']:.4f} over "
                       f"{r['linears']} linears -> {r['output']}\ncalibration {ratio}\n{mem}".rstrip()
         + f"\n(total command time {time.perf_counter() - t0:.1f}s)")
    return 0


def _cmd_sweep(args) -> int:
    from accel.cli import emit
    from accel.eval.sweep_prune import format_table, plot, prune_sweep

    cols = [c.strip() for c in args.sparsities.split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    r = prune_sweep(args.model, cols, methods, args.max_tokens, args.seq_len, args.n_samples, args.calib_seq_len,
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
        plot(r["table"], cols, args.plot)
        text += f"\nplot -> {args.plot}"
    emit(r["table"], args.json, text)
    return 0


def _export_hf(artifact: str, output: str, model: str | None = None, overwrite: bool = False):
    from .prune import export_hf

    return export_hf(artifact, output, model=model, overwrite=overwrite)


def register(cli) -> None:
    from accel.configs.prune import CALIB_MODES, DSNOT_OBJECTIVES

    helps = {"wanda": "Wanda pruning masks (|W|*||X_j||, per output row; unstructured or N:M)",
             "magnitude": "magnitude pruning masks (|W| per layer; the baseline)",
             "dsnot": "DSnoT prune-and-grow refinement on top of a Wanda or magnitude mask"}
    for kind, help_ in helps.items():
        p = cli.add("calibrate", kind, help_)
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--output", required=True, help="artifact directory to write")
        p.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --output")
        p.add_argument("--sparsity", type=float, default=None, help="fraction pruned in [0, 1) (default 0.5)")
        p.add_argument("--pattern", default=None, help="unstructured (default) or N:M, e.g. 2:4, 4:8")
        p.add_argument("--n-samples", type=int, default=128)
        p.add_argument("--seq-len", type=int, default=512)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--targets", default=None, help="comma-separated names / classes / re:regexes")
        p.add_argument("--ignore", default=None, help="comma-separated names / classes / re:regexes")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        p.add_argument("--use-variant", action="store_true", help="Wanda's per-row cumulative-score variant")
        p.add_argument("--init", default="wanda", choices=["wanda", "magnitude"], help="(dsnot) initial mask")
        p.add_argument("--max-cycles", type=int, default=50, help="(dsnot) prune-and-grow cycles per layer")
        p.add_argument("--threshold", type=float, default=0.1, help="(dsnot) stop when |error| <= this")
        p.add_argument("--mode", default="auto", choices=list(CALIB_MODES),
                       help="joined: one layer forward per layer (memory grows with the calibration "
                            "tokens); two-pass: Wanda's stats-then-recompute pipeline; auto: joined if "
                            "it fits in a quarter of the RAM")
        p.add_argument("--objective", default=None, choices=list(DSNOT_OBJECTIVES),
                       help="(dsnot) swap acceptance: mean = |expected error| (the paper's), mse-diag = expected "
                            "squared error with uncorrelated inputs, mse = exact layer reconstruction error "
                            "(needs X^T X); default: PruneConfig's")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_cmd_calibrate, prune_kind=kind)

    s = cli.add("eval", "prune-sweep", "perplexity table: dense / magnitude / wanda / wanda+dsnot x sparsities")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--sparsities", default="0.5,0.6,0.7,2:4,4:8", help="columns: sparsities and N:M patterns")
    s.add_argument("--methods", default="magnitude,wanda,wanda+dsnot",
                   help="rows; a DSnoT objective may follow, e.g. wanda+dsnot:mean,wanda+dsnot:mse")
    s.add_argument("--max-tokens", type=int, default=16384)
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--n-samples", type=int, default=16, help="calibration samples")
    s.add_argument("--calib-seq-len", type=int, default=512)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="calibration and evaluation dtype (dense fp32 ppl is printed beside it)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--no-fp32-check", action="store_true", help="skip the dense fp32 perplexity")
    s.add_argument("--no-dense", action="store_true", help="skip the dense row (split a sweep over processes)")
    s.add_argument("--plot", default=None, help="write ppl-vs-sparsity PNG here")
    s.add_argument("--json", action="store_true", help="last line: {row: {column: ppl}}")
    s.set_defaults(func=_cmd_sweep)

    cli.exporter("hf", _export_hf, "plain HF checkpoint with the pruned weights (prune artifacts)")
