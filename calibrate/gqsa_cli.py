"""`accel calibrate gqsa`: a GQSAConfig from the arguments, through `accel.calibrate`."""
from __future__ import annotations

import argparse
import dataclasses


def config_from_args(args):
    from accel.configs.gqsa import GQSAConfig

    return GQSAConfig(bits=args.bits, sparsity=args.sparsity, group_size=args.group_size,
                      tile_rows=args.tile_rows, init=args.init, allocation=args.allocation,
                      owl_lambda=args.owl_lambda, bqpo_steps=args.bqpo_steps, bqpo_lr=args.bqpo_lr,
                      bqpo_batch=args.bqpo_batch, bqpo_eval_samples=args.bqpo_eval_samples,
                      bqpo_keep_best=args.bqpo_keep_best, e2e_steps=args.e2e_steps, e2e_lr=args.e2e_lr,
                      e2e_holdout=args.e2e_holdout, e2e_eval_every=args.e2e_eval_every,
                      e2e_patience=args.e2e_patience, targets=args.targets, ignore=args.ignore)


def _cmd(args) -> int:
    import torch

    import accel
    from accel.cli import calibration_spec, check_output, emit

    check_output(args)  # before hours of calibration, not after
    cfg = config_from_args(args)  # a bad value fails here, before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = accel.models.load(args.model, dtype=args.dtype)
    # Checkpoints in --checkpoint-dir (default OUTPUT.partial), removed after success.
    art = accel.calibrate(model, cfg, calibration_spec(args), args.output, tokenizer=tok,
                          checkpoint_dir=args.checkpoint_dir, overwrite=args.overwrite, progress=not args.json)
    path = art.path
    c = art.calibration
    emit({"output": str(path), "config": cfg.to_dict(), **{k: c[k] for k in ("stage1_seconds", "stage2_seconds")}},
         args.json, f"wrote {path} (stage 1 {c['stage1_seconds']}s, stage 2 {c['stage2_seconds']}s)")
    return 0


def register(cli) -> None:
    from accel.cli import add_calibration_args
    from accel.configs.gqsa import GQSAConfig

    # Option defaults are the config's own, so the two cannot drift apart.
    d = {f.name: f.default for f in dataclasses.fields(GQSAConfig)}

    p = cli.add("calibrate", "gqsa", "GQSA: group-sparse int-N weights, BQPO (+ optional E2E-OQP)")
    add_calibration_args(p, "gqsa")
    p.add_argument("--bits", type=int, default=d["bits"], help="2, 3, 4 or 8")
    p.add_argument("--sparsity", type=float, default=d["sparsity"], help="fraction of groups pruned per row, [0, 1)")
    p.add_argument("--group-size", type=int, default=d["group_size"], help="input channels per group (divides in_features)")
    p.add_argument("--tile-rows", type=int, default=d["tile_rows"],
                   help="rows sharing kept groups (1 = per row; e.g. 192 lets the CPU path compact)")
    p.add_argument("--init", default=d["init"], choices=["obs", "rtn"],
                   help="stage-1 start: obs = second-order group pruning + GPTQ rounding; rtn = Wanda scores + RTN")
    p.add_argument("--allocation", default=d["allocation"], choices=["owl", "uniform"],
                   help="layer sparsities: owl = spread by outlier ratio (same mean); uniform = all at --sparsity")
    p.add_argument("--owl-lambda", type=float, default=d["owl_lambda"], help="OWL spread: layer sparsity within ±lambda")
    p.add_argument("--bqpo-steps", type=int, default=d["bqpo_steps"], help="stage-1 Adam steps per decoder block")
    p.add_argument("--bqpo-lr", type=float, default=d["bqpo_lr"], help="stage-1 Adam learning rate")
    p.add_argument("--bqpo-batch", type=int, default=d["bqpo_batch"], help="calibration samples per BQPO step")
    p.add_argument("--bqpo-eval-samples", type=int, default=d["bqpo_eval_samples"],
                   help="fixed calibration samples the block error is measured on before/after each BQPO step "
                        "(0 = all)")
    p.add_argument("--bqpo-keep-best", action=argparse.BooleanOptionalAction, default=d["bqpo_keep_best"],
                   help="keep the lowest block error seen, the stage-1 start included (--no-bqpo-keep-best: "
                        "the last step)")
    p.add_argument("--e2e-steps", type=int, default=d["e2e_steps"], help="stage-2 (E2E-OQP) steps; 0 = stage 1 only")
    p.add_argument("--e2e-lr", type=float, default=d["e2e_lr"], help="stage-2 learning rate")
    p.add_argument("--e2e-holdout", type=float, default=d["e2e_holdout"],
                   help="fraction of calibration samples held out of stage 2; the best held-out scales/zeros "
                        "are kept (0 = no guard)")
    p.add_argument("--e2e-eval-every", type=int, default=d["e2e_eval_every"],
                   help="stage-2 steps between held-out evaluations")
    p.add_argument("--e2e-patience", type=int, default=d["e2e_patience"],
                   help="stop stage 2 after this many held-out evaluations without a gain")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.set_defaults(func=_cmd, make_config=config_from_args)
