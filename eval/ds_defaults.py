"""How Double Sparsity's defaults (r label channels, label bits) were chosen: passkey retrieval at
one budget on filler and prose haystacks, per model and context, for each candidate, plus the
perplexity check of the candidates at budget 1/8 (within 5% of dense).

    python -m accel.eval.ds_defaults --models smollm2-135m,qwen2.5-0.5b,gemma3-270m --n 20 \\
        --output eval/results/ds_passkey_defaults.json

A candidate is "d/DIV:BITS" (r = head_dim // DIV label channels stored in BITS bits); d/8:16 and
d/4:8 spend the same label bytes per token. Every decode step is sparse (min_context=0). Each
prompt's outcome is appended to `--records` (JSON lines) as it is measured, so an interrupted run
can be summarised with `--from-records` instead of being lost.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

log = logging.getLogger(__name__)

CANDIDATES = ("d/8:16", "d/4:8", "d/4:4")
PASS = 0.95
PPL_SLACK = 1.05


def parse_candidate(s: str) -> tuple[int, int]:
    """"d/4:8" -> (4, 8): head_dim divisor and label bits."""
    try:
        div, bits = s.strip().removeprefix("d/").split(":")
        div, bits = int(div), int(bits)
    except ValueError:
        raise ValueError(f"candidate {s!r} must look like d/4:8 (r = head_dim/4, 8-bit labels)") from None
    if div < 1 or bits not in (4, 8, 16):
        raise ValueError(f"candidate {s!r}: divisor must be >= 1 and bits 4, 8 or 16")
    return div, bits


def candidate_config(base, name: str, head_dim: int, budget: float):
    div, bits = parse_candidate(name)
    return dataclasses.replace(base, budget=budget, heavy_channels=max(1, head_dim // div), label_bits=bits,
                               min_context=0)


def _calibrate(model, tok, n_samples: int):
    from accel.calibrate.double_sparsity import calibrate_double_sparsity

    return calibrate_double_sparsity(model, tok, n_samples=n_samples, progress=False)


def measure_model(name: str, args, records) -> None:
    """Passkey records for one model, then its ppl row, appended to `records` (a file open for appending)."""
    import accel
    from accel.configs.double_sparsity import DoubleSparsityConfig
    from accel.patches.double_sparsity import model_dims

    from .ds_retrieval import make_prompts, solve_prompts

    model, tok = accel.models.load(name, dtype=args.dtype)
    t0 = time.perf_counter()
    art = _calibrate(model, tok, args.calib_samples)
    log.info("[%s] calibrated on %d x 512 tokens in %.0fs", name, args.calib_samples, time.perf_counter() - t0)
    D = model_dims(model)["head_dim"]
    base = DoubleSparsityConfig()
    tensors = {f"double-sparsity/{k}": v for k, v in art.tensors_for("double-sparsity").items()}
    methods = {"dense": None, **{c: candidate_config(base, c, D, args.budget) for c in args.candidates}}
    cells = {(ctx, hay): make_prompts(tok, "passkey", [ctx], args.n, args.seed, haystack=hay)
             for ctx in args.contexts for hay in args.haystacks}
    # Prompt i of every cell before prompt i + 1 of any: an interrupted run leaves every cell with
    # about the same number of prompts.
    for i in range(args.n):
        for (ctx, hay), prompts in cells.items():
            t = time.perf_counter()
            ok = solve_prompts(model, tok, [prompts[i]], methods, tensors, args.new_tokens, progress=False)
            rec = {"model": name, "context": ctx, "haystack": hay, "prompt": i, "dtype": args.dtype,
                   "budget": args.budget, "head_dim": D, "solved": {m: v[0] for m, v in ok.items()},
                   "seconds": round(time.perf_counter() - t, 1)}
            records.write(json.dumps(rec) + "\n")
            records.flush()
        log.info("[%s] prompt %d of %d done in every cell", name, i + 1, args.n)
    if name in args.ppl_models:
        records.write(json.dumps({"model": name, "ppl": measure_ppl(model, tok, art, base, D, args)}) + "\n")
        records.flush()


def measure_ppl(model, tok, art, base, D, args) -> dict:
    """Dense and each candidate at budget 1/8 (sparse scoring, min_context=0), wiki, seq_len windows."""
    import accel
    from accel.artifact import Artifact
    from accel.data import eval_tokens

    from .perplexity import perplexity

    ids = eval_tokens(tok, "wiki", args.ppl_tokens)
    tensors = {f"double-sparsity/{k}": v for k, v in art.tensors_for("double-sparsity").items()}

    def ppl():
        return perplexity(model, ids, seq_len=args.seq_len, batch_size=1, progress=False).ppl

    res = {"tokens": int(ids.numel()), "seq_len": args.seq_len, "budget": 1 / 8, "dense": ppl()}
    for c in args.candidates:
        cfg = dataclasses.replace(candidate_config(base, c, D, 1 / 8), score_mode="sparse")
        with accel.patched(model, Artifact(configs=[cfg], tensors=tensors), check_fingerprint=False):
            res[c] = ppl()
        log.info("ppl 1/8 %s: %.3f (dense %.3f)", c, res[c], res["dense"])
    return res


def summarize(records: list[dict], ppl: dict, candidates, meta: dict) -> dict:
    """Accuracy per model / context / haystack / method, and which candidates meet the targets."""
    acc: dict = {}
    ppl = {**ppl, **{r["model"]: r["ppl"] for r in records if "ppl" in r}}
    for r in records:
        if "ppl" in r:
            continue
        cell = acc.setdefault(r["model"], {}).setdefault(str(r["context"]), {}).setdefault(r["haystack"], {})
        for m, ok in r["solved"].items():
            cell.setdefault(m, []).append(bool(ok))
    def cell_row(ms):
        dense = ms.get("dense")
        row = {"n": len(next(iter(ms.values()))), **{m: sum(v) / len(v) for m, v in ms.items()}}
        if dense is not None:
            # Of the prompts dense attention solves, the share each candidate solves too: what the
            # sparsity loses, apart from what the model cannot do at all.
            row["dense_solved"] = sum(dense)
            for m, v in ms.items():
                if m != "dense" and sum(dense):
                    row[f"{m} of dense"] = sum(a and b for a, b in zip(v, dense)) / sum(dense)
        return row

    table = {mo: {cx: {h: cell_row(ms) for h, ms in hs.items()} for cx, hs in cs.items()} for mo, cs in acc.items()}
    verdict = {}
    for c in candidates:
        cells = [cell for cs in table.values() for hs in cs.values() for cell in hs.values() if c in cell]
        raw = [cell[c] for cell in cells]
        rel = [cell[f"{c} of dense"] for cell in cells if f"{c} of dense" in cell]
        ppl_ok = {mo: p[c] <= PPL_SLACK * p["dense"] for mo, p in ppl.items() if c in p}
        verdict[c] = {"passkey_min": min(raw) if raw else None, "passkey_ok": bool(raw) and min(raw) >= PASS,
                      "of_dense_min": min(rel) if rel else None,
                      "solved_of_dense": [sum(round(cell[f"{c} of dense"] * cell["dense_solved"]) for cell in cells
                                              if f"{c} of dense" in cell),
                                          sum(cell["dense_solved"] for cell in cells)],
                      "ppl_ok": ppl_ok}
    return {"meta": meta, "passkey": table, "ppl": ppl, "verdict": verdict}


def format_summary(res: dict) -> str:
    cands = res["meta"]["candidates"]
    lines = [f"passkey at budget {res['meta']['budget']:g}, min_context=0, {res['meta']['dtype']}",
             f"{'model':<14}{'ctx':>6} {'haystack':<8}{'n':>4}{'dense':>7}" + "".join(f"{c:>9}" for c in cands)]
    for mo, cs in res["passkey"].items():
        for cx, hs in cs.items():
            for h, cell in hs.items():
                lines.append(f"{mo:<14}{cx:>6} {h:<8}{cell['n']:>4}{cell.get('dense', float('nan')):7.2f}"
                             + "".join(f"{cell.get(c, float('nan')):9.2f}" for c in cands)
                             + "   of dense: " + " ".join(f"{cell.get(c + ' of dense', float('nan')):.2f}"
                                                         for c in cands))
    for mo, p in res["ppl"].items():
        lines.append(f"ppl {mo} ({p['tokens']} wiki tokens, seq {p['seq_len']}, budget 1/8): dense {p['dense']:.3f}, "
                     + ", ".join(f"{c} {p[c]:.3f} ({p[c] / p['dense'] - 1:+.1%})" for c in cands if c in p))
    for c, v in res["verdict"].items():
        lines.append(f"{c}: passkey min {v['passkey_min']}, >= {PASS:.0%} everywhere: {v['passkey_ok']}; solved "
                     f"{v['solved_of_dense'][0]} of the {v['solved_of_dense'][1]} prompts dense solves (worst cell "
                     f"{v['of_dense_min']}); ppl within 5%: {v['ppl_ok']}")
    return "\n".join(lines)


def format_markdown(res: dict) -> str:
    """The passkey table as markdown (docs/methods/double_sparsity.md): accuracy, and in brackets
    the share of the prompts dense attention solves that the candidate solves too."""
    cands = res["meta"]["candidates"]
    lines = ["| model | context | haystack | n | dense | " + " | ".join(cands) + " |",
             "|---|---|---|---|---|" + "---|" * len(cands)]
    for mo, cs in res["passkey"].items():
        for cx, hs in cs.items():
            for h, cell in hs.items():
                def one(c):
                    rel = cell.get(f"{c} of dense")
                    return f"{cell[c]:.2f}" + ("" if rel is None else f" ({rel:.2f})")
                lines.append(f"| {mo} | {cx} | {h} | {cell['n']} | {cell['dense']:.2f} | "
                             + " | ".join(one(c) for c in cands) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from accel.artifact import check_output_path, write_file

    from .ds_cli import _fraction_list, _int_list

    p = argparse.ArgumentParser(prog="python -m accel.eval.ds_defaults", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=["smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"])
    p.add_argument("--candidates", type=lambda s: s.split(","), default=list(CANDIDATES))
    p.add_argument("--contexts", type=_int_list, default=[2048, 4096])
    p.add_argument("--haystacks", type=lambda s: s.split(","), default=["filler", "prose"])
    p.add_argument("--n", type=int, default=20, help="prompts per model, context and haystack")
    p.add_argument("--budget", type=lambda s: _fraction_list(s)[0], default=1 / 16)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--calib-samples", type=int, default=32, help="512-token calibration windows per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--ppl-models", type=lambda s: [x for x in s.split(",") if x], default=["smollm2-135m"])
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--records", default=None, help="JSON-lines file of per-prompt outcomes (appended)")
    p.add_argument("--from-records", nargs="+", default=None, metavar="FILE",
                   help="summarise these records files (written by --records) instead of measuring")
    p.add_argument("--output", default=None, help="write the summary JSON here")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--markdown", action="store_true", help="also print the passkey table as markdown")
    p.add_argument("--note", default=None, help="a line stored in the summary's meta (how the run went)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for c in args.candidates:
        parse_candidate(c)
    if args.output:
        check_output_path(args.output, args.overwrite, "file")
    meta = {k: getattr(args, k) for k in ("models", "candidates", "contexts", "haystacks", "n", "budget", "dtype",
                                          "calib_samples", "seed", "new_tokens")}
    meta.update(min_context=0, pass_threshold=PASS, ppl_slack=PPL_SLACK, note=args.note)
    ppl: dict = {}
    if args.from_records:
        recs = [json.loads(line) for f in args.from_records for line in open(f) if line.strip()]
        # What the records hold, not this command line's defaults (n is per cell in the table).
        runs = [r for r in recs if "solved" in r]
        meta.update(models=list(dict.fromkeys(r["model"] for r in recs)),
                    contexts=sorted({r["context"] for r in runs}), haystacks=sorted({r["haystack"] for r in runs}),
                    n=max((r["prompt"] + 1 for r in runs), default=0), dtype=runs[0].get("dtype", args.dtype) if runs else args.dtype)
    else:
        import os
        import tempfile

        path = args.records or tempfile.mkstemp(prefix="ds_defaults.", suffix=".jsonl")[1]
        with open(path, "a") as fh:
            for name in args.models:
                measure_model(name, args, fh)
        recs = [json.loads(line) for line in open(path) if line.strip()]
        if not args.records:
            os.unlink(path)
    res = summarize(recs, ppl, args.candidates, meta)
    print(format_summary(res))
    if args.markdown:
        print(format_markdown(res))
    if args.output:
        doc = json.dumps(res, indent=1) + "\n"

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(doc)

        write_file(args.output, write, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
