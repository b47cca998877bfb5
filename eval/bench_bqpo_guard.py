"""What the BQPO guard costs (issue 16), SmolLM2, one process:

    .venv/bin/python -m accel.eval.bench_bqpo_guard [--steps 8] [--rounds 3] [--ppl]

Per decoder layer, the seconds of `bqpo_block` (RTN start, 16 x 256 calibration tokens, batch 2,
8 fixed samples) for: "unguarded" (keep_best=False: the block error measured at the two ends
only), "every-step" (measured after every step: the guard as first written) and "guard" (the
default, every ceil(8 / 2) = 4 steps). Configurations alternate round by round; medians and
ratios to "unguarded" are printed, so load from other processes hits all alike. --ppl adds a
full GQSA W4S50 calibration (OBS start, the README demo's 2 BQPO steps unless --steps) with the
every-step guard and with the default, and the wiki perplexity of each (16K tokens, seq 512).
--e2e instead measures the E2E-OQP held-out guard's effect (`e2e_guard_effect`).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import time

import torch


def _layer_times(steps: int, rounds: int, layers=(0, 10, 20)) -> dict:
    import accel
    from accel.calibrate.gqsa import GQSALayerMethod
    from accel.calibrate.gqsa_opt import _swap, bqpo_block
    from accel.calibrate.runner import capture_inputs
    from accel.configs.gqsa import GQSAConfig
    from accel.data import CalibrationSpec, calibration_samples
    from accel.patches import compat

    model, tok = accel.models.load("smollm2-135m")
    x = calibration_samples(tok, CalibrationSpec(n_samples=16, seq_len=256))
    data = capture_inputs(model, x)
    cfg = GQSAConfig(bits=4, sparsity=0.5, group_size=16, init="rtn", allocation="uniform", bqpo_steps=0)
    meth = GQSALayerMethod(model, cfg)
    runs = {"unguarded": dict(keep_best=False), "every-step": dict(eval_every=1), "guard": {}}
    times = {k: [] for k in runs}
    mse = {k: {} for k in runs}
    setups = []
    for i, layer in enumerate(compat.decoder_layers(model)):
        if i in layers:
            tgt = torch.cat(data.forward(layer, i))
            _, fq = meth._init_rtn(cfg, i, layer, data, meth._names(i))
            setups.append((i, layer, fq, torch.cat(data.hidden), tgt))
        if i >= max(layers):
            break
        data.advance(layer, i)
    for _ in range(rounds):
        for name, kw in runs.items():
            t = time.perf_counter()
            for i, layer, fq0, inputs, tgt in setups:
                fq = copy.deepcopy(fq0)
                olds = {r: _swap(layer, r, m) for r, m in fq.items()}
                try:
                    mse[name][i] = bqpo_block(layer, fq, inputs, tgt, lambda b, i=i: data.kwargs_for(i, b, "cpu"),
                                              steps, cfg.bqpo_lr, 2, i, eval_samples=8, **kw)
                finally:
                    for r, o in olds.items():
                        _swap(layer, r, o)
            times[name].append((time.perf_counter() - t) / len(setups))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"steps": steps, "layers": list(layers), "rounds": rounds, "seconds_per_layer": med,
            "ratio_to_unguarded": {k: round(v / med["unguarded"], 3) for k, v in med.items()},
            "block_mse_before_kept": {k: {str(i): [float(f"{a:.4g}"), float(f"{b:.4g}")] for i, (a, b) in v.items()}
                                      for k, v in mse.items()}}


def _ppl(steps: int) -> dict:
    import accel
    from accel.calibrate import gqsa as G
    from accel.calibrate.gqsa_opt import bqpo_block
    from accel.configs.gqsa import GQSAConfig
    from accel.data import CalibrationSpec, eval_tokens
    from accel.eval.perplexity import perplexity

    model, tok = accel.models.load("smollm2-135m")
    ids = eval_tokens(tok, "wiki", 16384)
    out = {}
    for name, fn in (("every-step", functools.partial(bqpo_block, eval_every=1)), ("guard", bqpo_block)):
        work = copy.deepcopy(model)
        G.bqpo_block = fn
        try:
            cfg = GQSAConfig(bits=4, sparsity=0.5, group_size=16, bqpo_steps=steps, bqpo_batch=2)
            t = time.perf_counter()
            art = G.calibrate_gqsa(work, tok, cfg, CalibrationSpec(n_samples=16, seq_len=256), progress=False,
                                   keep_changes=True)
            secs = time.perf_counter() - t
        finally:
            G.bqpo_block = bqpo_block
        out[name] = {"calib_seconds": round(secs, 1), "stage1_seconds": art.calibration["stage1_seconds"],
                     "wiki_ppl": round(perplexity(work, ids, seq_len=512, progress=False).ppl, 3)}
        del work
    return out


def e2e_guard_effect(n_samples: int = 32, seq_len: int = 256, steps: int = 64, tokens: int = 16384) -> dict:
    """Issue 16's stage-2 guard on SmolLM2: GQSA W4S50 stage 1 once (2 BQPO steps), then E2E-OQP
    (`steps`, batch 2, lr 2e-5) with e2e_holdout=0 and with the default, on the same samples;
    perplexity of stage 1 and of each on wiki and shakespeare (`tokens` each, seq 512, fp32)."""
    import accel
    from accel.calibrate.gqsa import calibrate_gqsa
    from accel.calibrate.gqsa_opt import e2e_oqp
    from accel.configs.gqsa import GQSAConfig
    from accel.data import CalibrationSpec, calibration_samples, eval_tokens
    from accel.eval.perplexity import perplexity
    from accel.kernels.gqsa_linear.format import GQSAWeight

    model, tok = accel.models.load("smollm2-135m")
    spec = CalibrationSpec(n_samples=n_samples, seq_len=seq_len)
    samples = calibration_samples(tok, spec)
    corpora = {c: eval_tokens(tok, c, tokens) for c in ("wiki", "shakespeare")}
    cfg = GQSAConfig(bits=4, sparsity=0.5, group_size=16, bqpo_steps=2, bqpo_batch=2)
    art = calibrate_gqsa(model, tok, cfg, spec, samples=samples, progress=False, keep_changes=True)
    t = {k[len("gqsa/"):]: v for k, v in art.tensors.items()}
    packed = {n: GQSAWeight.from_tensors(t, n) for n in (k[:-len(".meta")] for k in t if k.endswith(".meta"))}

    def ppl(m) -> dict:
        return {c: round(perplexity(m, ids, seq_len=512, progress=False).ppl, 3) for c, ids in corpora.items()}

    out = {"calibration": f"{n_samples} x {seq_len} wiki calibration tokens; stage 1: 2 BQPO steps; stage 2: "
                          f"{steps} E2E-OQP steps, batch 2, lr 2e-5", "eval_tokens": tokens, "stage1": ppl(model)}
    print(json.dumps(out), flush=True)
    for h in (0.0, cfg.e2e_holdout):
        m, rec = copy.deepcopy(model), {}
        e2e_oqp(m, dict(packed), samples, steps=steps, lr=2e-5, batch=2, tile_rows=cfg.tile_rows, progress=False,
                seed=spec.seed, holdout=h, eval_every=cfg.e2e_eval_every, patience=cfg.e2e_patience, record=rec)
        out[f"e2e_holdout={h:g}"] = {"ppl": ppl(m), "steps_run": rec.get("steps_run"), "kept_step": rec.get("kept_step")}
        print(json.dumps({f"e2e_holdout={h:g}": out[f"e2e_holdout={h:g}"]}), flush=True)
        del m
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="BQPO steps (default 8; 2 with --ppl)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl", action="store_true")
    p.add_argument("--e2e", action="store_true", help="only the E2E-OQP held-out guard's ppl effect (issue 16)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.e2e:
        print(json.dumps(e2e_guard_effect(steps=a.steps or 64), indent=1))
        return
    res = _layer_times(a.steps or 8, a.rounds)
    print(json.dumps(res, indent=1), flush=True)
    if a.ppl:
        print(json.dumps({"ppl": _ppl(a.steps or 2)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
