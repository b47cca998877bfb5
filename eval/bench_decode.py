"""`accel bench decode`: prefill time and greedy decode tokens/s, eager and compiled, dense and each
method, at each thread count: one process, configurations interleaved round by round (median of
rounds), so load from other processes on a shared VM hits every configuration alike.

Speed-only artifacts: GQSA by round-to-nearest (`rtn_artifact`), the others by a tiny calibration
(2 x 32 tokens): their accuracy is not what is measured. Decode tok/s = (N - 1) / (t(N) - t(1))
of generate() with N and 1 new tokens (so the prefill and the first token are not counted);
prefill = t(1). Compiled rows use `accel.compile` (static cache, inductor by default); its first
call's seconds are `compile_seconds`. With `--llama-bench PATH`, llama.cpp's `llama-bench` runs on
the same GGUF (`--gguf`, default the embedded SmolLM2) at the same thread counts.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import signal
import statistics
import subprocess
import time

import torch

log = logging.getLogger(__name__)

METHODS = ("gqsa", "prune", "rsparse", "ds")
# Per llama-bench call (one thread count).
LLAMA_BENCH_TIMEOUT_S = 600


def speed_artifact(model, method: str, seed: int = 0):
    """An artifact for `method` made fast (speed only)."""
    import accel

    if method == "gqsa":
        from accel.calibrate.gqsa import rtn_artifact
        from accel.configs.gqsa import GQSAConfig
        return rtn_artifact(model, GQSAConfig(bits=4, sparsity=0.5, group_size=16))
    from accel.configs.double_sparsity import DoubleSparsityConfig
    from accel.configs.prune import PruneConfig
    from accel.configs.rsparse import RSparseConfig
    cfg = {"prune": PruneConfig(init="magnitude", sparsity=0.5), "rsparse": RSparseConfig(sparsity=0.5),
           "ds": DoubleSparsityConfig(budget=0.25, min_context=0)}.get(method)
    if cfg is None:
        raise ValueError(f"bench decode: unknown method {method!r}; choose from {', '.join(METHODS)}")
    x = torch.randint(1, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
    return accel.calibrate(model, cfg, data=x, progress=False)


def _gen_seconds(model, ids, n: int, static: bool) -> float:
    kw = dict(cache_implementation="static") if static else {}
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, **kw)
    return time.perf_counter() - t


def bench_decode(model_name: str = "smollm2-135m", methods=("gqsa",), threads=(1, 2), new_tokens: int = 32,
                 prompt_tokens: int | tuple = 32, rounds: int = 3, compile: bool = True, dtype: str = "bfloat16",
                 backend: str = "inductor", llama_bench: str | None = None, gguf: str | None = None,
                 prefill_only: bool = False) -> dict:
    """{"rows": [...], "<config>_tok_s_<n>t": ..., "compile_seconds": {...}, ...} (see module docstring).

    prompt_tokens: one length, or several (each row then has its own, keys end in `_<P>p`), all
    interleaved in each round. "prefill_speedup": {"<config>/<P>p/<n>t": dense prefill / config
    prefill}, against the dense row of the same mode (eager or compiled). prefill_only: time t(1) only
    (no decode rows: decode_tok_s is None)."""
    import accel

    if isinstance(model_name, str) and model_name.startswith("tiny-"):
        model = accel.models.tiny(model_name[5:], dtype=getattr(torch, dtype))
    else:
        model, _ = accel.models.load(model_name, dtype=dtype)
    prompts = (prompt_tokens,) if isinstance(prompt_tokens, int) else tuple(prompt_tokens)
    ids_by = {p: torch.randint(1, model.config.vocab_size, (1, p), generator=torch.Generator().manual_seed(0))
              for p in prompts}
    ids = ids_by[prompts[0]]
    arts = {p: speed_artifact(model, p) for m in methods for p in m.split("+")}
    max_len = max(prompts) + new_tokens + 1
    # One model per configuration: a compiled graph holds the modules it was traced with.
    configs = {}
    for name in ("dense",) + tuple(methods):
        for comp in ((False, True) if compile else (False,)):
            m = model if (name == "dense" and not comp) else copy.deepcopy(model)
            if name != "dense":
                for part in name.split("+"):
                    accel.patch(m, arts[part])
            configs[f"{name}_{'compiled' if comp else 'eager'}"] = (m, comp)
    compile_seconds = {}
    old_threads = torch.get_num_threads()
    times = {(c, t, p): {"first": [], "full": []} for c in configs for t in threads for p in prompts}
    try:
        for c, (m, comp) in configs.items():
            if comp:
                torch.set_num_threads(threads[0])
                compile_seconds[c] = accel.compile(m, backend=backend, max_cache_len=max_len).seconds
                # A new thread count recompiles (inductor's code is specialised to it): pay it here,
                # not inside the timed rounds.
                for t in threads[1:]:
                    torch.set_num_threads(t)
                    _gen_seconds(m, ids, 2, True)
        for _ in range(rounds):
            for t in threads:
                torch.set_num_threads(t)
                for p in prompts:
                    for c, (m, comp) in configs.items():
                        times[(c, t, p)]["first"].append(_gen_seconds(m, ids_by[p], 1, comp))
                        if not prefill_only:
                            times[(c, t, p)]["full"].append(_gen_seconds(m, ids_by[p], new_tokens, comp))
    finally:
        torch.set_num_threads(old_threads)
    out = {"model": model_name, "dtype": dtype, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
           "rounds": rounds, "threads": list(threads), "backend": backend, "rows": [], "prefill_speedup": {}}
    for (c, t, p), v in times.items():
        first = statistics.median(v["first"])
        tok_s = None if prefill_only else (new_tokens - 1) / max(statistics.median(v["full"]) - first, 1e-9)
        out["rows"].append({"config": c, "threads": t, "prompt_tokens": p, "prefill_s": first, "decode_tok_s": tok_s})
        sfx = f"_{t}t" if len(prompts) == 1 else f"_{t}t_{p}p"
        out[f"{c}_tok_s{sfx}"] = tok_s
        out[f"{c}_prefill_s{sfx}"] = first
        dense = statistics.median(times[("dense_" + c.rpartition("_")[2], t, p)]["first"])
        if not c.startswith("dense_"):
            out["prefill_speedup"][f"{c}/{p}p/{t}t"] = dense / first
    # The slowest compile (each compiled row compiles its own graph); per row in compile_seconds_by_config.
    out["compile_seconds"] = max(compile_seconds.values(), default=0.0)
    out["compile_seconds_by_config"] = compile_seconds
    if llama_bench:
        out["llama_cpp"] = run_llama_bench(llama_bench, gguf, threads, new_tokens, prompts[0])
    return out


def run_llama_bench(binary: str, gguf: str | None, threads, new_tokens: int, prompt_tokens: int) -> list[dict]:
    """llama.cpp's llama-bench on the GGUF: [{"threads", "prefill_tok_s", "decode_tok_s"}]."""
    import accel

    from accel.configs.base import ConfigError

    exe = shutil.which(binary) or binary
    gguf = gguf or str(accel.models.smollm2_gguf_path())
    rows = []
    for t in threads:
        cmd = [exe, "-m", gguf, "-t", str(t), "-p", str(prompt_tokens), "-n", str(new_tokens), "-o", "json"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=LLAMA_BENCH_TIMEOUT_S)
        except OSError as e:
            raise ConfigError(f"--llama-bench {binary}: cannot run it ({e})") from e
        except subprocess.TimeoutExpired as e:
            # A loaded machine: OpenMP's active spin-wait makes 2-thread llama-bench crawl; OMP_WAIT_POLICY=passive.
            raise ConfigError(f"--llama-bench {binary}: `{' '.join(cmd)}` timed out after {e.timeout} s "
                              f"(a loaded machine? try OMP_WAIT_POLICY=passive)") from e
        if res.returncode:
            sig = -res.returncode
            why = (f"killed by signal {sig} ({signal.Signals(sig).name if sig in signal.valid_signals() else '?'})"
                   if sig > 0 else f"exit code {res.returncode}")
            last = (res.stderr.strip().splitlines() or [""])[-1]
            # An AMX build of llama.cpp 0c1e570 segfaults here (scripts/build_llama_bench.sh builds without AMX).
            raise ConfigError(f"--llama-bench {binary}: `{' '.join(cmd)}` failed, {why}; last stderr line: {last!r}")
        # llama-bench prints one test object per run: the prompt run (n_prompt > 0) and the generation run.
        row = {"threads": t}
        for r in json.loads(res.stdout):
            row["prefill_tok_s" if r.get("n_prompt", 0) else "decode_tok_s"] = r.get("avg_ts")
        rows.append(row)
    return rows


def _csv(s: str, conv=str) -> tuple:
    return tuple(conv(v) for v in s.split(",") if v.strip())


def _cmd(args) -> int:
    from accel.cli import emit

    prompts = _csv(args.prompt_tokens, int)
    r = bench_decode(args.model, _csv(args.methods), _csv(args.threads, int), args.new_tokens,
                     prompts[0] if len(prompts) == 1 else prompts, args.rounds, args.compile, args.dtype, args.backend,
                     args.llama_bench, args.gguf, args.prefill_only)
    lines = [f"{row['config']:>22} {row['threads']}t {row['prompt_tokens']:>6}p  prefill {row['prefill_s'] * 1e3:8.1f} ms"
             + ("" if row["decode_tok_s"] is None else f"  decode {row['decode_tok_s']:7.1f} tok/s") for row in r["rows"]]
    lines += [f"prefill vs dense {k}: {v:.2f}x" for k, v in r["prefill_speedup"].items()]
    lines += [f"compile {k}: {v:.1f} s" for k, v in r["compile_seconds_by_config"].items()]
    emit(r, args.json, "\n".join(lines))
    return 0


def register(cli) -> None:
    b = cli.add("bench", "decode", "prefill time and decode tok/s: dense and methods, eager and compiled, per thread count")
    b.add_argument("--model", default="smollm2-135m", help="a model name, or tiny-<arch> (tests)")
    b.add_argument("--methods", default="gqsa", help=f"comma list from {', '.join(METHODS)}; a+b stacks (ds+gqsa)")
    b.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    b.add_argument("--compile", action="store_true", help="also the compiled rows (accel.compile)")
    b.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows")
    b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--prompt-tokens", default="32", help="prompt length, or a comma list (e.g. 32,512,8192)")
    b.add_argument("--prefill-only", action="store_true", help="time the prefill only (no decode rows)")
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--llama-bench", default=None, metavar="PATH", help="llama.cpp's llama-bench binary")
    b.add_argument("--gguf", default=None, help="GGUF for --llama-bench (default: the embedded SmolLM2)")
    b.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
    b.set_defaults(func=_cmd)
