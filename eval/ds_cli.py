"""Double Sparsity evaluations and benchmarks: `accel eval ds-sweep|ds-retrieval`, `accel bench ds-attention|ds-offload`."""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def _fraction_list(s: str) -> list[float]:
    from accel.calibrate.ds_cli import _budget

    return [_budget(x) for x in s.split(",") if x.strip()]


def _int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _load(model_name: str, dtype: str, artifact: str | None, calib_samples: int):
    """Model, tokenizer and a double-sparsity artifact (calibrated now when none is given)."""
    import accel
    from accel.artifact import Artifact

    model, tok = accel.models.load(model_name, dtype=dtype)
    if artifact:
        art = Artifact.load(artifact)
        if not art.tensors_for("double-sparsity"):
            raise ValueError(f"{artifact} is not a double-sparsity artifact")
    else:
        from accel.calibrate.double_sparsity import calibrate_double_sparsity

        log.info("no --artifact: calibrating channels on %d x 512 tokens first", calib_samples)
        art = calibrate_double_sparsity(model, tok, n_samples=calib_samples)
    return model, tok, art


def _base_config(art, args):
    import dataclasses

    from accel.configs.double_sparsity import DoubleSparsityConfig

    cfgs = [c for c in art.configs if isinstance(c, DoubleSparsityConfig)]
    base = cfgs[0] if cfgs else DoubleSparsityConfig()
    over = {k: getattr(args, k) for k in ("group_reduce", "sink", "recent", "n_dense", "label_bits", "channel_type",
                                          "heavy_channels")
            if getattr(args, k, None) is not None}
    return dataclasses.replace(base, **over)


def _cmd_sweep(args) -> int:
    from accel.cli import emit
    from accel.data import eval_tokens

    from accel.artifact import check_output_path

    from .sweep_ds import format_table, plot_sweep, run_sweep

    if args.plot:  # fail fast, before the sweep
        check_output_path(args.plot, args.overwrite, "file")
    model, tok, art = _load(args.model, args.dtype, args.artifact, args.num_calibration_samples)
    tokens = eval_tokens(tok, args.source, args.max_tokens)
    res = run_sweep(model, tokens, art, budgets=args.budgets, channels=args.channels, rows=args.rows,
                    seq_len=args.seq_len, batch_size=args.batch_size, base=_base_config(art, args),
                    progress=not args.json)
    text = (f"Double Sparsity perplexity, {res['tokens']} tokens in {args.seq_len}-token windows, {args.dtype}\n"
            + format_table(res))
    if args.plot:
        text += f"\nwrote {plot_sweep(res, args.plot, overwrite=args.overwrite)}"
    emit(res["table"], args.json, text)
    return 0


def _cmd_retrieval(args) -> int:
    from accel.cli import emit

    from .ds_retrieval import format_retrieval, run_retrieval

    model, tok, art = _load(args.model, args.dtype, args.artifact, args.num_calibration_samples)
    res = run_retrieval(model, tok, art, tasks=args.tasks, contexts=args.contexts, n=args.n, budget=args.budget,
                        base=_base_config(art, args), seed=args.seed, progress=not args.json,
                        min_context=args.min_context, haystack=args.haystack)
    emit(res, args.json, format_retrieval(res))
    return 0


def _cmd_bench_attention(args) -> int:
    from accel.cli import emit

    from .bench_ds_attention import format_table, run_bench

    res = run_bench(contexts=tuple(args.contexts), dtypes=tuple(args.dtypes), fraction=1 / args.inv_fraction,
                    rounds=args.rounds, e2e_context=args.e2e_context, e2e_tokens=args.e2e_tokens,
                    e2e=not args.no_e2e, threads=args.threads)
    emit(res, args.json, format_table(res))
    return 0


def _cmd_bench_offload(args) -> int:
    import torch

    from accel.cli import emit

    from .bench_ds_offload import run_bench

    torch.set_num_threads(args.threads)
    res = run_bench(tuple(args.contexts), args.steps, args.inv_fraction, args.mem_cap_mb, args.smol_context,
                    not args.no_smol, args.offload_dir)
    lines = [f"setup: {res['setup']}"]
    for r in res["synthetic"]:
        lines.append(f"ctx {r['context']:>6}: dense KV {r['dense_kv_mb']:.0f} MiB, device {r['device_mb']:.1f} MiB "
                     f"(ratio {r['device_bytes_ratio']:.3f}), moved/token ratio {r['moved_bytes_ratio']:.4f}, "
                     f"tok/s DS {r['tokens_per_s_ds']:.1f} vs offload {r['tokens_per_s_offload']:.1f} "
                     f"(ratio {r['tokens_per_s_ratio']:.2f}), tokens equal {r['tokens_equal']}, "
                     f"max |dlogit| {r['max_logit_diff']:.2e}")
    c = res["mem_cap"]
    lines.append(f"mem cap {c['mem_cap_mb']:.0f} MB, ctx {c['context']} (dense KV {c['dense_kv_mb']:.0f} MiB): "
                 f"peak RSS {c['peak_rss_mb']:.0f} MB = {c['base_rss_mb']:.0f} after load + {c['added_rss_mb']:.0f} "
                 f"added -> within cap {c['within_cap']}, logits vs in-memory DS max |d| {c['max_logit_diff']:.2e}")
    if "smollm2" in res:
        s = res["smollm2"]
        lines.append(f"SmolLM2 ctx {s['context']}: predicted-selection hit rate {s['hit_rate']:.3f}, offload(exact) "
                     f"tokens equal in-memory DS {s['tokens_equal_exact']}, predicted tokens agree "
                     f"{s['predicted_tokens_agree']:.2f}, device ratio {s['device_bytes_ratio']:.3f}, "
                     f"moved ratio {s['moved_bytes_ratio']:.3f}")
    emit(res, args.json, "\n".join(lines))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    from accel.cli import add_sweep_calibration_args

    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--artifact", default=None, help="double-sparsity artifact (default: calibrate first)")
    # 512-token calibration windows when no --artifact is given.
    add_sweep_calibration_args(p, n_samples=32, old_samples=("--calib-samples", "--n-samples"))
    p.add_argument("--group-reduce", default=None, choices=["max", "sum"])
    p.add_argument("--channel-type", default=None, choices=["q", "k", "qk"])
    p.add_argument("--sink", type=int, default=None)
    p.add_argument("--recent", type=int, default=None)
    p.add_argument("--n-dense", type=int, default=None)
    p.add_argument("--label-bits", type=int, default=None, choices=[4, 8, 16])
    p.add_argument("--json", action="store_true", help="last stdout line is one JSON object")


def register(cli) -> None:
    from accel.cli import add_overwrite

    p = cli.add("eval", "ds-sweep", "Double Sparsity perplexity table: budget x channels vs baselines")
    _common(p)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--source", default="wiki")
    p.add_argument("--budgets", type=_fraction_list, default=[1 / 4, 1 / 8, 1 / 16], help="e.g. 1/4,1/8,1/16")
    p.add_argument("--channels", type=_int_list, default=None, help="r values, e.g. 4,8,16 (default d/16,d/8,d/4)")
    p.add_argument("--rows", type=lambda s: s.split(","), default=["dense", "ds", "random", "sink_recent", "oracle"])
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--plot", default=None, help="write a PNG of ppl against budget")
    add_overwrite(p)
    p.set_defaults(func=_cmd_sweep)

    q = cli.add("eval", "ds-retrieval", "passkey and key-value retrieval accuracy: dense, Double Sparsity, sink+recent")
    _common(q)
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    q.add_argument("--tasks", type=lambda s: s.split(","), default=["passkey", "kv"])
    q.add_argument("--contexts", type=_int_list, default=[1024, 2048, 4096])
    q.add_argument("--n", type=int, default=10, help="prompts per task and context length")
    q.add_argument("--budget", type=_fraction_list, default=[1 / 16], help="token budget(s), e.g. 1/16")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--haystack", default="filler", choices=["filler", "prose"],
                   help="passkey haystack: a repeated filler paragraph (default) or natural prose (wiki "
                        "evaluation articles, different ones per prompt)")
    q.add_argument("--min-context", type=int, default=0, metavar="TOKENS",
                   help="decode steps with fewer cached tokens stay dense (default 0: every decode step is "
                        "sparse, what this test measures; pass the artifact's value to see what generate() does)")
    q.add_argument("--heavy-channels", type=int, default=None,
                   help="r label channels (default: the artifact's; its full channel scores are stored)")
    q.set_defaults(func=_cmd_retrieval)

    b = cli.add("bench", "ds-attention", "Double Sparsity CPU decode attention and SmolLM2 decode speed vs dense")
    b.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    b.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                   help="first one is used for speedup_8k/32k and the end-to-end run")
    b.add_argument("--inv-fraction", type=int, default=16, help="budget = T / this (default 16)")
    b.add_argument("--rounds", type=int, default=9)
    b.add_argument("--e2e-context", type=int, default=4096)
    b.add_argument("--e2e-tokens", type=int, default=16)
    b.add_argument("--no-e2e", action="store_true", help="skip the SmolLM2 end-to-end run")
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1: ratios on a shared VM)")
    b.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
    b.set_defaults(func=_cmd_bench_attention)

    o = cli.add("bench", "ds-offload", "Double Sparsity-Offload: device/moved bytes, decode speed, hit rate, mem cap")
    o.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768])
    o.add_argument("--steps", type=int, default=8, help="decode steps per run")
    o.add_argument("--inv-fraction", type=int, default=16, help="budget = context / this")
    o.add_argument("--mem-cap-mb", type=float, default=256)
    o.add_argument("--smol-context", type=int, default=2048)
    o.add_argument("--no-smol", action="store_true", help="skip the SmolLM2 hit-rate run")
    o.add_argument("--offload-dir", default=None, help="directory for the slow tier (default: temp dir)")
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
    o.set_defaults(func=_cmd_bench_offload)
