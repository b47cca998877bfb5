"""`accel calibrate rsparse`: an RSparseConfig from the arguments, through `accel.calibrate`."""
from __future__ import annotations

import dataclasses

import argparse


def add_search_args(p: argparse.ArgumentParser) -> None:
    """The search settings `calibrate rsparse` and `eval rsparse-sweep` share."""
    p.add_argument("--greedy-tokens", type=int, default=512, help="tokens for the greedy block-error grid")
    p.add_argument("--population", type=int, default=6, help="evolutionary search population")
    p.add_argument("--generations", type=int, default=4, help="evolutionary search generations")


def evo_settings(args):
    from .rsparse_search import EvoSettings

    return EvoSettings(population=args.population, generations=args.generations)


def config_from_args(args):
    from accel.configs.rsparse import RSparseConfig

    rho = 1.0 if args.mode == "teal" else args.sparse_share
    return RSparseConfig(sparsity=args.sparsity, sparse_share=rho, mode=args.mode, search=args.search,
                         targets=args.targets, ignore=args.ignore)


def _cmd_calibrate(args) -> int:
    import accel
    from accel.cli import calibration_spec, check_output, emit

    from .api import _calibrate  # accel.calibrate, with the method's own search settings

    check_output(args)  # before the calibration, not after
    cfg = config_from_args(args)
    model, tok = accel.models.load(args.model, dtype=args.dtype)
    # Checkpoints in --checkpoint-dir (default OUTPUT.partial), removed after success.
    art = _calibrate(model, cfg, calibration_spec(args), args.output, tokenizer=tok,
                     checkpoint_dir=args.checkpoint_dir, overwrite=args.overwrite, progress=not args.json,
                     calibrator_kwargs={"greedy_tokens": args.greedy_tokens, "evo": evo_settings(args)})
    path = art.path
    c = art.calibration
    emit({"artifact": str(path), "model": args.model, **cfg.to_dict()["params"], "budget": c["budget"],
          "mean_rho": c["mean_rho"], "evo_history": c.get("evo_history")}, args.json,
         f"wrote {path}: {cfg.mode} search={cfg.search} budget={c['budget']:.4f} mean rho={c['mean_rho']:.3f} "
         f"over {c['linears']} linears")
    return 0


def register(cli) -> None:
    from accel.cli import add_calibration_args

    from accel.configs.rsparse import RSparseConfig

    # Option defaults are the config's own, so the two cannot drift apart.
    d = {f.name: f.default for f in dataclasses.fields(RSparseConfig)}
    p = cli.add("calibrate", "rsparse", "R-Sparse (sparse + low-rank) or TEAL-style activation sparsity")
    add_calibration_args(p, "rsparse")
    add_search_args(p)
    p.add_argument("--sparsity", type=float, default=d["sparsity"], help="model-level budget in [0, 1)")
    p.add_argument("--search", default=d["search"], choices=["greedy", "evo", "uniform"])
    p.add_argument("--mode", default=d["mode"], choices=["rsparse", "teal"])
    p.add_argument("--sparse-share", type=float, default=d["sparse_share"], help="uniform rho (sparse share of the budget)")
    p.set_defaults(func=_cmd_calibrate, make_config=config_from_args)
