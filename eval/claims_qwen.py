"""Issue 16's claim on Qwen2.5-0.5B: Wanda+DSnoT 60% beats Wanda 60%, on wiki and on a second
corpus (shakespeare), with the calibration budget stated. Reproduces eval/results/qwen_claims.json:

    .venv/bin/python -m accel.eval.claims_qwen [--n-samples 32] [--calib-seq-len 512] [--tokens 16384]
        [--rows dense,wanda,wanda+dsnot,wanda+dsnot-noguard] [--output eval/results/qwen_claims.json] [--overwrite]

Row "wanda+dsnot" is Wanda+DSnoT as PruneConfig v3 runs it by default, with its sink guard
(`dsnot_sink_guard=True`): no DSnoT swap may raise a row's error on the first token of each
calibration sample (the attention sink; see calibrate/dsnot.py `_SinkGuard`).
"wanda+dsnot-noguard" is DSnoT without it (PruneConfig v2's behaviour).

One model (accel.models.load("qwen2.5-0.5b"), cached), calibrated and evaluated in bf16 as
`accel eval prune-sweep` does (its config_for / prune_model); the dense weights are restored
before each row. Perplexity: `tokens` evaluation tokens of each corpus, windows of 512.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


ROWS = ("dense", "wanda", "wanda+dsnot", "wanda+dsnot-noguard")


def run(n_samples: int = 32, calib_seq_len: int = 512, tokens: int = 16384, seq_len: int = 512,
        sparsity: str = "0.6", seed: int = 0, progress: bool = True, on_row=None, rows=ROWS[:3],
        model_name: str = "qwen2.5-0.5b") -> dict:
    """model_name: another embedded model for a regression check of the same rows (smollm2-135m)."""
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise ValueError(f"claims_qwen: unknown row {bad[0]!r}; rows are {', '.join(ROWS)}")
    import accel
    from accel.calibrate.prune import prune_model
    from accel.data import CalibrationSpec, bos_token_id, calibration_samples, eval_tokens

    from .perplexity import perplexity
    from .sweep_prune import config_for

    model, tok = accel.models.load(model_name, dtype=torch.float32)
    spec = CalibrationSpec(n_samples=n_samples, seq_len=calib_seq_len, seed=seed)
    samples = calibration_samples(tok, spec)
    corpora = {c: eval_tokens(tok, c, tokens) for c in ("wiki", "shakespeare")}
    model.to(torch.bfloat16)
    dense_sd = {k: v.clone() for k, v in model.state_dict().items()}
    bos = bos_token_id(tok)
    out = {"model": model_name, "dtype": "bfloat16", "seq_len": seq_len, "eval_tokens": tokens,
           "calibration": {**spec.to_dict(), "budget": f"{n_samples} x {calib_seq_len} tokens (wiki calibration split)"},
           "rows": {}}

    def ppl(name: str) -> dict:
        return {c: round(perplexity(model, ids, seq_len=seq_len, progress=progress, desc=f"{name} {c}",
                                    bos_token_id=bos).ppl, 3) for c, ids in corpora.items()}

    for name in rows:
        model.load_state_dict(dense_sd)
        t0 = time.perf_counter()
        if name != "dense":
            method, guard = name.removesuffix("-noguard"), not name.endswith("-noguard")
            prune_model(model, config_for(method, sparsity), samples, progress=progress, dsnot_sink_guard=guard)
        secs = time.perf_counter() - t0
        out["rows"][name if name == "dense" else f"{name} {sparsity}"] = {"ppl": ppl(name),
                                                                           "calib_seconds": round(secs, 1)}
        if on_row:
            on_row(out)
    model.load_state_dict(dense_sd)
    got = out["rows"]
    out["claim"] = {}
    for name in rows:
        if name.startswith("wanda+") and f"wanda {sparsity}" in got:
            w, d = got[f"wanda {sparsity}"]["ppl"], got[f"{name} {sparsity}"]["ppl"]
            out["claim"][f"{name} beats wanda"] = {c: d[c] < w[c] for c in corpora}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--model", default="qwen2.5-0.5b", help="embedded model (smollm2-135m: regression check)")
    p.add_argument("--rows", default="dense,wanda,wanda+dsnot", help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--output", default="eval/results/qwen_claims.json")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    from accel.artifact import check_output_path, write_file

    check_output_path(a.output, a.overwrite, "file")  # before the work
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run(a.n_samples, a.calib_seq_len, a.tokens, rows=tuple(r for r in a.rows.split(",") if r),
              model_name=a.model)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(json.dumps(res, indent=1) + "\n")
    write_file(a.output, write, overwrite=a.overwrite)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
