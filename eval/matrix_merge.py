"""`accel eval matrix-merge A.json B.json ... --output M.json [--plot DIR]`: one matrix from runs
of `accel eval matrix` made apart (one model per run, on different days or machines), with the
composition check and the speed target computed again over the whole, and its plots.

Runs merge only when they measured the same way: every accuracy setting (tokens, windows, passkey,
calibration budget, seed, dtype) must be equal, and so must the speed settings of runs that
measured speed; a (model, row) measured twice is refused rather than silently picked.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SPEED_FIELDS = ("contexts", "threads", "rounds", "new_tokens")


def _accuracy_fields() -> tuple[str, ...]:
    # Every other MatrixSettings field: a setting added there is compared here without a second list.
    from .matrix import MatrixSettings

    return tuple(f.name for f in dataclasses.fields(MatrixSettings) if f.name not in (*SPEED_FIELDS, "speed"))


def _load(path) -> dict:
    from accel.configs import ConfigError

    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"matrix results {p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"matrix results {p}: not a JSON file ({e})") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("records"), list)
            and isinstance((doc.get("summary") or {}).get("settings"), dict)):
        raise ConfigError(f"matrix results {p}: not a results file of `accel eval matrix` "
                          f"(needs 'records' and 'summary.settings')")
    return doc


def _norm(v):
    # JSON turns the settings' tuples into lists; compare them as tuples.
    return tuple(v) if isinstance(v, list) else v


def merge_docs(docs: list[dict], names: list[str] | None = None) -> tuple[list[dict], "object"]:
    """(records, MatrixSettings) of several results documents; ConfigError when they differ in how
    they measured, or when a (model, row) appears twice."""
    from accel.configs import ConfigError

    from .matrix import MatrixSettings

    if not docs:
        raise ConfigError("matrix-merge: no results files given")
    names = names or [f"#{i + 1}" for i in range(len(docs))]
    sets = [{k: _norm(v) for k, v in d["summary"]["settings"].items()} for d in docs]
    base = sets[0]
    for s, n in zip(sets[1:], names[1:]):
        for f in _accuracy_fields():
            if s.get(f) != base.get(f):
                raise ConfigError(f"matrix-merge: {n} measured {f}={s.get(f)!r}, {names[0]} {base.get(f)!r}: "
                                  f"results of different settings do not merge")
    speed = [(s, n) for s, n in zip(sets, names) if s.get("speed")]
    for s, n in speed[1:]:
        for f in SPEED_FIELDS:
            if s.get(f) != speed[0][0].get(f):
                raise ConfigError(f"matrix-merge: {n} measured speed with {f}={s.get(f)!r}, {speed[0][1]} "
                                  f"{speed[0][0].get(f)!r}: results of different settings do not merge")
    seen: dict = {}
    records = []
    for d, n in zip(docs, names):
        if d.get("incomplete"):
            log.warning("matrix-merge: %s is the file of an interrupted run (%s)", n, d["incomplete"])
        for r in d["records"]:
            k = (r.get("model"), r.get("row"))
            if k in seen:
                raise ConfigError(f"matrix-merge: model {k[0]} row {k[1]} is in both {seen[k]} and {n}")
            seen[k] = n
            records.append(r)
    merged = {**base, **({f: speed[0][0][f] for f in SPEED_FIELDS} if speed else {}), "speed": bool(speed)}
    known = {f.name for f in dataclasses.fields(MatrixSettings)}
    settings = MatrixSettings(**{k: v for k, v in merged.items() if k in known})
    if speed and len(speed) < len(docs):
        log.warning("matrix-merge: %d of %d runs have no speed measurements; their rows have no speed columns",
                    len(docs) - len(speed), len(docs))
    return records, settings


def run_cli(args) -> int:
    from accel.artifact import write_file

    from .matrix import summary
    from .matrix_markdown import markdown_table, summary_lines
    from .matrix_plot import check_outputs, plot_matrix

    docs = [_load(p) for p in args.results]
    records, settings = merge_docs(docs, list(args.results))
    plotted = list(dict.fromkeys(r["model"] for r in records if r.get("speed")))
    output = Path(args.output)
    check_outputs(output, args.plot, plotted, settings.speed, args.overwrite,
                  "--plot needs speed measurements: none of the runs has them")
    final = summary(records, settings)
    doc = {"records": records, "summary": final, "merged_from": [str(p) for p in args.results]}
    write_file(output, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1, default=float)),
               overwrite=args.overwrite)
    print(markdown_table(records))
    print()
    print(summary_lines(final))
    if args.plot:
        paths = plot_matrix([r for r in records if r.get("speed")], args.plot, settings, overwrite=args.overwrite)
        print("wrote " + ", ".join(str(p) for p in paths))
    print(f"wrote {output}")
    return 0


def register(cli) -> None:
    from accel.cli import add_overwrite

    p = cli.add("eval", "matrix-merge", "one matrix (table, checks, plots) from several `accel eval matrix` runs "
                                        "of the same settings (docs/matrix.md)")
    p.add_argument("results", nargs="+", help="results JSON files of `accel eval matrix`")
    p.add_argument("--output", required=True, metavar="FILE", help="the merged results JSON")
    p.add_argument("--plot", default=None, metavar="DIR", help="write the scatter and bar-chart PNGs here")
    add_overwrite(p)
    p.set_defaults(func=run_cli)
