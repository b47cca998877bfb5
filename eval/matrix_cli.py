"""`accel eval matrix`: the command line of eval/matrix.py (docs/matrix.md)."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _csv(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def _ints(s: str) -> tuple[int, ...]:
    import argparse

    try:
        v = tuple(int(x) for x in _csv(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {s!r}")
    return v


def default_output() -> str:
    return f"eval/results/matrix-{_dt.date.today().isoformat()}.json"


def settings_from_args(args):
    from .matrix import QUICK, MatrixSettings

    base = dict(QUICK) if args.quick else {}
    given = {k: getattr(args, k) for k in ("max_tokens", "seq_len", "batch_size", "passkey_context", "passkey_n",
                                           "contexts", "threads", "rounds", "new_tokens", "num_calibration_samples",
                                           "max_seq_length", "seed", "dtype") if getattr(args, k) is not None}
    return MatrixSettings(**{**base, **given, "speed": not args.no_speed})


def fmt_model(records: list[dict], settings) -> str:
    """One table per model: a line per row."""
    keys = [f"{c}/{t}t" for c in settings.contexts for t in settings.threads] if settings.speed else []
    m = records[0]["model"]
    head = (f"{'row':<15}" + "".join(f"{'ppl ' + c[:5]:>11}" for c in settings.corpora) + f"{'passkey':>8}"
            + f"{'bytes':>7}" + "".join(f"{'pre ' + k:>12}{'dec ' + k:>12}" for k in keys))
    lines = [f"== {m}: ppl over {settings.max_tokens} tokens in {settings.seq_len}-token windows ({settings.dtype}); "
             f"passkey at {settings.passkey_context} (n={settings.passkey_n}); bytes = weights / dense bf16; "
             f"pre/dec = prefill / decode speedup vs dense bf16 (context/threads)", head]
    for r in records:
        pk = r.get("passkey")
        line = (f"{r['row']:<15}" + "".join(f"{r['ppl'][c]:>11.3f}" for c in settings.corpora)
                + (f"{pk['ds']:>8.2f}" if pk else f"{'-':>8}") + f"{r.get('weight_ratio', float('nan')):>7.3f}")
        for k in keys:
            s = r["speed"][k]
            line += f"{s['prefill_speedup']:>11.2f}x{s['decode_speedup']:>11.2f}x"
        lines.append(line)
    if keys:
        d = next(r for r in records if r["row"] == "dense") if any(r["row"] == "dense" for r in records) else None
        if d is not None:
            lines.append("dense bf16: " + ", ".join(f"{k} prefill {d['speed'][k]['prefill_s']:.2f}s decode "
                                                      f"{d['speed'][k]['decode_tok_s']:.1f} tok/s" for k in keys))
    for r in records:
        if r["calibration"]:
            lines.append(f"calibration {r['row']}: " + "; ".join(
                f"{s['method']} {s['n_samples']} x {s['seq_len']} {s['source']}" for s in r["calibration"])
                + (" (cached)" if r["calibration_cached"] else f" ({r['calibration_seconds']:.0f}s)"))
    return "\n".join(lines)


def fmt_summary(s: dict) -> str:
    lines = ["composition check: ppl(DS+X)/ppl(X) <= 1.03 x ppl(DS)/ppl(dense)"]
    for c in s["composition"]:
        if c["verdict"] == "N/A":
            lines.append(f"  {c['model']} {c['row']} {c['corpus']}: N/A ({c['why']})")
        else:
            lines.append(f"  {c['model']} {c['row']} {c['corpus']}: {c['ratio']:.4f} vs {c['bound']:.4f} "
                         f"{c['verdict']}")
    for t in s["speed_target"]:
        lines.append(f"speed target: {t['model']} ds+gqsa-w4s50 decode {t['decode_speedup']:.2f}x at "
                     f"{t['context']}/{t['threads']}t vs {t['target']}x: {t['verdict']}"
                     + (f" ({t['why']})" if "why" in t else ""))
    return "\n".join(lines)


def run_cli(args) -> int:
    from accel.artifact import write_file
    from accel.models import cache_dir

    from .matrix import check_models, run_model, summary
    from .matrix_plot import check_outputs, plot_matrix, plot_paths
    from .matrix_rows import check_rows

    models = check_models(_csv(args.models))
    rows = check_rows(_csv(args.rows))
    settings = settings_from_args(args)
    output = Path(args.output or default_output())
    # Fail fast: every output is checked before hours of work start.
    check_outputs(output, args.plot, models, settings.speed, args.overwrite,
                  "--plot needs the speed run (drop --no-speed)")
    cache = Path(args.cache_dir) if args.cache_dir else cache_dir() / "matrix"
    log.info("matrix: %d models x %d rows; settings %s; calibrations cached in %s", len(models), len(rows),
             dataclasses.asdict(settings), cache)
    records: list[dict] = []
    wrote = False

    def save(final: dict | None, partial: list[dict] = ()):
        nonlocal wrote
        recs = records + list(partial)
        doc = {"records": recs, "summary": final or summary(recs, settings)}
        if partial:
            doc["incomplete"] = f"{partial[0]['model']}: accuracy of {len(partial)} rows, no bytes nor speed yet"
        write_file(output, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1, default=float)),
                   overwrite=args.overwrite or wrote)
        wrote = True

    def on_row(rec):
        if args.json:
            print(json.dumps(rec, default=float), flush=True)

    for m in models:
        # The file is rewritten after each row's accuracy too: an interrupted model keeps its rows.
        recs = run_model(m, rows, settings, cache, progress=not args.json, on_row=on_row, recompute=args.recompute,
                         on_accuracy=lambda part: save(None, part))
        records.extend(recs)
        if not args.json:
            print(fmt_model(recs, settings), flush=True)
        save(None)  # after each model: hours of work are not lost to a later failure
    final = summary(records, settings)
    save(final)
    text = fmt_summary(final)
    if args.plot:
        paths = plot_matrix(records, args.plot, settings, overwrite=args.overwrite)
        text += "\nwrote " + ", ".join(str(p) for p in paths)
    text += f"\nwrote {output}"
    if args.json:
        print(json.dumps({**final, "output": str(output), "plots": [str(p) for p in plot_paths(args.plot, models)]
                          if args.plot else []}, default=float))
    else:
        print(text)
    return 0


def register(cli) -> None:
    from accel.cli import add_overwrite

    from .matrix_rows import DEFAULT_ROWS

    p = cli.add("eval", "matrix", "every method row on every model: perplexity (two corpora), passkey, weight "
                                  "bytes, CPU prefill/decode speed vs dense bf16 (docs/matrix.md)")
    p.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b,gemma3-270m", help="comma list of models")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma list of rows (docs/matrix.md)")
    p.add_argument("--quick", action="store_true",
                   help="smoke preset: 1024 tokens in 256-token windows, passkey at 512 (n=2), contexts 128,256, "
                        "1 round, 4 new tokens, calibrations of 4 x 128 tokens (an explicit option wins)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluation tokens per corpus (default 16384)")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity window, every row (default 2048)")
    p.add_argument("--batch-size", type=int, default=None, help="perplexity windows per forward (default 2)")
    p.add_argument("--passkey-context", type=int, default=None, help="passkey prompt tokens (default 4096)")
    p.add_argument("--passkey-n", type=int, default=None, help="passkey prompts (default 10)")
    p.add_argument("--contexts", type=_ints, default=None, help="speed prompt tokens (default 1024,8192)")
    p.add_argument("--threads", type=_ints, default=None, help="torch thread counts (default 1,2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved speed rounds (default 3)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per speed run (default 32)")
    p.add_argument("--num-calibration-samples", type=int, default=None, metavar="N",
                   help="calibration windows of every stage (default: each method's default)")
    p.add_argument("--max-seq-length", type=int, default=None, metavar="TOKENS",
                   help="tokens per calibration window (default: each method's default)")
    p.add_argument("--seed", type=int, default=None, help="calibration sample draw and passkey prompts (default 0)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype of calibration, perplexity and passkey (default float32; speed is always bf16)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed run (accuracy and bytes only)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="calibrated artifacts, reused by a rerun (default: <accel cache>/matrix)")
    p.add_argument("--recompute", action="store_true",
                   help="recompute perplexity and passkey even when an earlier run cached them for the same "
                        "artifact and settings")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="results JSON (default eval/results/matrix-<date>.json)")
    p.add_argument("--plot", default=None, metavar="DIR", help="write the scatter and bar-chart PNGs here")
    add_overwrite(p)
    p.add_argument("--json", action="store_true",
                   help="stdout: one JSON object per (model, row), then a summary object last")
    p.set_defaults(func=run_cli)
