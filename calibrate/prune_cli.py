"""`accel calibrate wanda|dsnot|magnitude` and `accel export --format hf|hf-dense`: shims over
`accel.calibrate.prune_artifact.calibrate_prune` (which goes through `accel.calibrate`)."""
from __future__ import annotations

import dataclasses

import time

from .prune_artifact import calibrate_prune  # noqa: F401  (the old import path of calibrate_prune)


def config_from_args(args):
    """The PruneConfig of `accel calibrate wanda|magnitude|dsnot` arguments."""
    from accel.configs.prune import PruneConfig

    dsnot = args.prune_kind == "dsnot"
    sparsity = args.sparsity
    if sparsity is None and args.pattern in (None, "unstructured"):
        sparsity = PruneConfig.__dataclass_fields__["sparsity"].default
    extra = {} if args.objective is None else {"dsnot_objective": args.objective}
    return PruneConfig(init=args.init if dsnot else args.prune_kind, dsnot=dsnot, sparsity=sparsity,
                       pattern=args.pattern or PruneConfig.__dataclass_fields__["pattern"].default,
                       use_variant=args.use_variant,
                       max_cycles=args.max_cycles, threshold=args.threshold, targets=args.targets,
                       ignore=args.ignore, **extra)


def _cmd_calibrate(args) -> int:
    from accel.cli import calibration_spec, emit

    cfg = config_from_args(args)  # a bad value fails here, before the model loads
    t0 = time.perf_counter()
    # The calibration data as a CalibrationSpec (source, samples, length, seed): accel.calibrate
    # draws it (`samples` is calibrate_prune's data argument).
    r = calibrate_prune(args.output, init=cfg.init, dsnot=cfg.dsnot, model_name=args.model,
                        sparsity=cfg.sparsity, pattern=cfg.pattern, use_variant=cfg.use_variant,
                        samples=calibration_spec(args), max_cycles=cfg.max_cycles, threshold=cfg.threshold,
                        objective=args.objective, targets=cfg.targets, ignore=cfg.ignore,
                        batch_size=args.batch_size, dtype=args.dtype, progress=not args.json, mode=args.mode,
                        overwrite=args.overwrite, checkpoint_dir=args.checkpoint_dir)
    ratio = (f"({r['mode']}) {r['seconds']:.1f}s = {r['time_ratio']:.2f}x one plain forward over the same "
             f"{args.num_calibration_samples}x{args.max_seq_length} calibration set ({r['forward_seconds']:.1f}s); "
             f"CPU time {r['cpu_seconds']:.1f}s = {r['cpu_time_ratio']:.2f}x ({r['forward_cpu_seconds']:.1f}s)"
             if r["time_ratio"] else f"{r['seconds']:.2f}s (no calibration data needed)")
    mem = (f"peak RSS {r['peak_rss_mb']:.0f} MB, layer activations {r['activation_mb']:.0f} MB"
           if r["peak_rss_mb"] else "")
    emit(r, args.json, f"{r['method']} {r['pattern']} sparsity {r['sparsity_measured']:.4f} over "
                       f"{r['linears']} linears -> {r['output']}\ncalibration {ratio}\n{mem}".rstrip()
         + f"\n(total command time {time.perf_counter() - t0:.1f}s)")
    return 0


def _export_hf(artifact: str, output: str, model: str | None = None, overwrite: bool = False):
    from .prune import export_hf

    return export_hf(artifact, output, model=model, overwrite=overwrite)


def register(cli) -> None:
    from accel.cli import add_calibration_args
    from accel.configs.prune import CALIB_MODES, DSNOT_OBJECTIVES, PruneConfig

    # Option defaults are the config's own, so the two cannot drift apart.
    d = {f.name: f.default for f in dataclasses.fields(PruneConfig)}

    helps = {"wanda": "Wanda pruning masks (|W|*||X_j||, per output row; unstructured or N:M)",
             "magnitude": "magnitude pruning masks (|W| per layer; the baseline)",
             "dsnot": "DSnoT prune-and-grow refinement on top of a Wanda or magnitude mask"}
    for kind, help_ in helps.items():
        p = cli.add("calibrate", kind, help_)
        add_calibration_args(p, "prune")
        p.add_argument("--sparsity", type=float, default=None, help=f"fraction pruned in [0, 1) (default {d['sparsity']})")
        p.add_argument("--pattern", default=None, help="unstructured (default) or N:M, e.g. 2:4, 4:8")
        p.add_argument("--batch-size", type=int, default=8, help="calibration windows per layer forward")
        p.add_argument("--use-variant", action="store_true", help="Wanda's per-row cumulative-score variant")
        p.add_argument("--init", default=d["init"], choices=["wanda", "magnitude"], help="(dsnot) initial mask")
        p.add_argument("--max-cycles", type=int, default=d["max_cycles"], help="(dsnot) prune-and-grow cycles per layer")
        p.add_argument("--threshold", type=float, default=d["threshold"], help="(dsnot) stop when |error| <= this")
        p.add_argument("--mode", default="auto", choices=list(CALIB_MODES),
                       help="joined: one layer forward per layer (memory grows with the calibration "
                            "tokens); two-pass: Wanda's stats-then-recompute pipeline; auto: joined if "
                            "it fits in a quarter of the RAM")
        p.add_argument("--objective", default=None, choices=list(DSNOT_OBJECTIVES),
                       help="(dsnot) swap acceptance: mean = |expected error| (the paper's), mse-diag = expected "
                            "squared error with uncorrelated inputs, mse = exact layer reconstruction error "
                            "(needs X^T X); default: PruneConfig's")
        p.set_defaults(func=_cmd_calibrate, prune_kind=kind, make_config=config_from_args)

    # The accel checkpoint (every method, not only pruning) is registered here, with the old
    # dense export it replaced as `hf`.
    from accel.hf_checkpoint import register as register_hf

    register_hf(cli)
    cli.exporter("hf-dense", _export_hf, "plain HF checkpoint with the pruned weights zeroed (prune artifacts), "
                                         "for tools that do not know accel")
