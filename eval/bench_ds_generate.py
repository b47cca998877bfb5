"""What a `generate()` user sees at a long context with Double Sparsity: dense bf16 against DS,
GQSA W4S50 and DS + GQSA (two patch calls), eager `generate()` with the default DynamicCache.

    python -m accel.eval.bench_ds_generate --model smollm2-135m --context 8192 --threads 2

One process, rows interleaved round by round (each round patches a row onto the same model,
runs one greedy generate() over a prose prompt (the wiki evaluation text) and unpatches it), so
load from other processes hits every row alike. Per row: the prefill seconds (time to the first
new token, median over rounds) and the decode tokens/s = 1 / (median step time), the steps of
every round pooled (a step = the time between two new tokens, stamped by a stopping criterion).
Ratios are against the dense row of the same run.

`--compile` adds the row "ds+gqsa compiled": DS + GQSA under `accel.compile` (static cache, compiled
decode step, fast plain linears) on a deep copy of the model, patched and compiled once before the
rounds (the compile's seconds are reported apart, not in any timing), measured in the same rounds.

Speed-only artifacts: DS calibrated on 2 x 64 random tokens (its channels' quality is not what is
measured), GQSA by round-to-nearest (`accel.calibrate.gqsa.rtn_artifact`). DS runs with
`min_context=0` unless `--min-context` says otherwise (its default, 8192, keeps shorter
decode dense).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

log = logging.getLogger(__name__)

ROWS = ("dense", "ds", "gqsa", "ds+gqsa")
COMPILED = "ds+gqsa compiled"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _Stamps:
    """A StoppingCriteria that never stops and records when each new token arrived."""

    def __init__(self, clock) -> None:
        self.t: list[float] = []
        self.clock = clock

    def __call__(self, input_ids, scores, **kwargs):
        self.t.append(self.clock())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_steps(model, ids: torch.Tensor, new_tokens: int, clock: str = "wall") -> tuple[float, list[float]]:
    """(prefill seconds, [seconds of each decode step]) of one greedy eager `generate()`, by `clock`
    ("wall", or "cpu": this process's CPU seconds, which at 1 thread hardly depend on the load of
    other processes; at more threads it counts every thread, spin-waits included)."""
    from transformers import StoppingCriteriaList

    st = _Stamps(CLOCKS[clock])
    t0 = st.clock()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       stopping_criteria=StoppingCriteriaList([st]))
    return st.t[0] - t0, [b - a for a, b in zip(st.t, st.t[1:])]


def artifacts(model, budget: float, min_context: int, rows) -> dict:
    """row -> [artifacts patched in order] (speed only, see the module docstring)."""
    import accel
    from accel.calibrate.gqsa import rtn_artifact
    from accel.configs.double_sparsity import DoubleSparsityConfig
    from accel.configs.gqsa import GQSAConfig

    parts = {}
    if any("ds" in r for r in rows):
        x = torch.randint(1, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
        parts["ds"] = accel.calibrate(model, DoubleSparsityConfig(budget=budget, min_context=min_context),
                                      data=x, progress=False)
    if any("gqsa" in r for r in rows):
        parts["gqsa"] = rtn_artifact(model, GQSAConfig(bits=4, sparsity=0.5, group_size=16))
    return {r: [] if r == "dense" else [parts[p] for p in r.split("+")] for r in rows}


def bench(model_name: str = "smollm2-135m", context: int = 8192, threads: int = 2, new_tokens: int = 16,
          rounds: int = 3, rows=ROWS, budget: float = 1 / 16, min_context: int = 0, dtype: str = "bfloat16",
          profile_row: str | None = None, clock: str = "wall", compile: bool = False) -> dict:
    """One interleaved run (module docstring); compile: add the COMPILED row."""
    import copy

    import accel
    from accel.eval.matrix_speed import prompt_ids

    if model_name.startswith("tiny-"):
        model, tok = accel.models.tiny(model_name[5:], dtype=getattr(torch, dtype)), None
    else:
        model, tok = accel.models.load(model_name, dtype=dtype)
    model.eval()
    if tok is None:
        ids = torch.randint(1, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    else:
        ids = prompt_ids(tok, model, context)
    arts = artifacts(model, budget, min_context, tuple(rows) + (("ds+gqsa",) if compile else ()))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    timed = tuple(rows) + ((COMPILED,) if compile else ())
    prefill = {r: [] for r in timed}
    steps = {r: [] for r in timed}
    compile_s = None
    try:
        cmodel = None
        if compile:
            # A copy stays patched and compiled for every round (re-patching would recompile).
            cmodel = copy.deepcopy(model)
            for a in arts["ds+gqsa"]:
                accel.patch(cmodel, a)
            compile_s = accel.compile(cmodel, max_cache_len=context + new_tokens + 8).seconds
            log.info("ds+gqsa compiled in %.1f s", compile_s)
        for rd in range(rounds):
            for r in timed:
                m = cmodel if r == COMPILED else model
                patches = [] if r == COMPILED else arts[r]
                for a in patches:
                    accel.patch(m, a)
                try:
                    if rd == 0:
                        generate_steps(m, ids[:, :16], 2)  # first-call set-up stays out of the timings
                    p, s = generate_steps(m, ids, new_tokens, clock)
                    prefill[r].append(p)
                    steps[r].extend(s)
                    if profile_row == r and rd == rounds - 1:
                        _profile(m, ids)
                finally:
                    if patches:
                        accel.unpatch(m)
                log.info("round %d row %s: prefill %.2fs, step %.1f ms", rd + 1, r, p, 1e3 * statistics.median(s))
    finally:
        torch.set_num_threads(old)
    out = {"model": model_name, "context": context, "threads": threads, "new_tokens": new_tokens,
           "rounds": rounds, "budget": budget, "min_context": min_context, "clock": clock, "rows": {}}
    if compile_s is not None:
        out["compile_s"] = compile_s
    for r in timed:
        out["rows"][r] = {"prefill_s": statistics.median(prefill[r]),
                          "decode_tok_s": 1.0 / statistics.median(steps[r])}
    base = out["rows"].get("dense")
    for r, cell in out["rows"].items():
        if base is not None:
            cell["decode_speedup"] = cell["decode_tok_s"] / base["decode_tok_s"]
            cell["prefill_speedup"] = base["prefill_s"] / cell["prefill_s"]
    return out


def _profile(model, ids) -> None:
    """torch.profiler table of 4 decode steps after a prefill (logged at INFO)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(4):
                out = model(nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list from {', '.join(ROWS)}")
    ap.add_argument("--budget", type=float, default=1 / 16)
    ap.add_argument("--min-context", type=int, default=0)
    ap.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                    help="wall seconds, or this process's CPU seconds (use with --threads 1 on a loaded machine)")
    ap.add_argument("--profile", default=None, metavar="ROW", help="print a torch.profiler table of ROW's decode")
    ap.add_argument("--compile", action="store_true",
                    help=f"add the row {COMPILED!r}: DS + GQSA under accel.compile (compiled once, before the rounds)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = tuple(r for r in a.rows.split(",") if r)
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown {bad}; choose from {', '.join(ROWS)}")
    r = bench(a.model, a.context, a.threads, a.new_tokens, a.rounds, rows, a.budget, a.min_context,
              profile_row=a.profile, clock=a.clock, compile=a.compile)
    print(f"{r['model']} context {r['context']}, {r['threads']} threads, {r['rounds']} rounds x {r['new_tokens']} tokens, "
          f"{r['clock']} clock" + (f", compiled in {r['compile_s']:.0f} s" if "compile_s" in r else ""))
    for name, c in r["rows"].items():
        print(f"{name:>16}: decode {c['decode_tok_s']:6.2f} tok/s ({c.get('decode_speedup', float('nan')):.2f}x)  "
              f"prefill {c['prefill_s']:6.2f} s ({c.get('prefill_speedup', float('nan')):.2f}x)")
    if a.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
