"""The matrix results as a markdown table (README, docs/results.md):
`python -m accel.eval.matrix_markdown eval/results/matrix-<date>.json [--speed-keys 8192/2t,1024/1t]`.

One line per (model, row): perplexity on each corpus with its ratio to the model's dense row,
passkey (rows with Double Sparsity), weight bytes over dense bf16, then prefill / decode speedups
against dense bf16 for each context and thread count measured; the composition check and the
speed target follow as a list.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _speed_keys(records: list[dict]) -> list[str]:
    for r in records:
        if r.get("speed"):
            return list(r["speed"])
    return []


def markdown_table(records: list[dict], speed_keys: list[str] | None = None) -> str:
    """A markdown table of matrix records; speed_keys picks the "context/threads" columns (all by default)."""
    keys = _speed_keys(records) if speed_keys is None else list(speed_keys)
    corpora = list(records[0]["ppl"]) if records else []
    head = (["model", "row"] + [f"ppl {c} (×dense)" for c in corpora] + ["passkey", "bytes"]
            + [f"{w} {k.replace('/', ' ')}" for k in keys for w in ("prefill", "decode")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = {r["model"]: r for r in records if r["row"] == "dense"}
    for r in records:
        d = dense.get(r["model"])
        cells = [r["model"], f"`{r['row']}`"]
        for c in corpora:
            v = r["ppl"][c]
            cells.append(f"{v:.2f}" + (f" ({v / d['ppl'][c]:.2f})" if d and r is not d else ""))
        pk = r.get("passkey")
        cells.append(f"{pk['ds']:.0%} (n={pk['n']}, {pk['context']} tok)" if pk else "–")
        cells.append(f"{r['weight_ratio']:.2f}" if "weight_ratio" in r else "–")
        for k in keys:
            s = (r.get("speed") or {}).get(k)
            cells += [f"{s['prefill_speedup']:.2f}×", f"{s['decode_speedup']:.2f}×"] if s else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(summary: dict) -> str:
    out = []
    for c in summary.get("composition", []):
        if c["verdict"] == "N/A":
            out.append(f"- composition {c['model']} `{c['row']}` {c['corpus']}: N/A ({c['why']})")
        else:
            out.append(f"- composition {c['model']} `{c['row']}` {c['corpus']}: ppl(DS+X)/ppl(X) "
                       f"{c['ratio']:.3f} vs bound {c['bound']:.3f}: **{c['verdict']}**")
    for t in summary.get("speed_target", []):
        out.append(f"- speed target {t['model']} `ds+gqsa-w4s50` decode at {t['context']}/{t['threads']}t: "
                   f"{t['decode_speedup']:.2f}× vs {t['target']}×: **{t['verdict']}**")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m accel.eval.matrix_markdown", description=__doc__.split("\n")[0])
    p.add_argument("results", help="a results JSON of `accel eval matrix`")
    p.add_argument("--speed-keys", default=None, help="comma list of context/threads columns, e.g. 8192/2t,1024/1t")
    p.add_argument("--no-summary", action="store_true", help="the table only")
    a = p.parse_args(argv)
    doc = json.loads(Path(a.results).read_text())
    keys = [k.strip() for k in a.speed_keys.split(",")] if a.speed_keys else None
    print(markdown_table(doc["records"], keys))
    if not a.no_summary:
        print()
        print(summary_lines(doc["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
