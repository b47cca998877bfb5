"""`accel eval gqsa-sweep`: SmolLM2 perplexity of GQSA against dense, RTN and Wanda 2:4.

Every row states its quantization grid. The embedded SmolLM2 was Q4_1 (4-bit, 32-blocks along the
input dim, asymmetric) before dequantization, so 4-bit groups that align with those blocks
(g = 16, 32) are nearly lossless on it; rows with g = 24 (not aligned) and 3/2-bit show the real cost.
GQSA rows are evaluated with the dequantized weights in place (the spec the kernels match).
"""
from __future__ import annotations

import copy
import logging
import re
import time

import torch

log = logging.getLogger(__name__)

ROWS = ("dense", "rtn-w4-g64", "rtn-w2-g16", "wanda-2:4", "gqsa-w4s50-g16-rtn", "gqsa-w4s50-g16-uniform", "gqsa-w4s50-g16",
        "gqsa-w4s50-g16+e2e",
        "gqsa-w3s50-g16", "gqsa-w4s50-g24", "gqsa-w4s50-g32", "gqsa-w4s50-g32-tile192")


def _rtn(model, bits: int, g: int) -> None:
    from accel.kernels.gqsa_linear.format import pack_weight
    from accel.patches.targets import iter_linears

    with torch.no_grad():
        for _, lin in iter_linears(model):
            lin.weight.copy_(pack_weight(lin.weight, sparsity=0.0, group_size=g, bits=bits).dequantize())


class _Wanda24:
    """Minimal inline Wanda 2:4: score |W|·||X_j|| on the layer's current inputs, keep 2 of every 4."""

    def __init__(self, model):
        from accel.patches.targets import iter_linears
        self.lins = dict(iter_linears(model))

    def process_layer(self, i, layer, data):
        from accel.calibrate.runner import linear_input_stats
        names = {n.split(f".{i}.", 1)[1]: m for n, m in self.lins.items() if f"layers.{i}." in n}
        sq = {}
        linear_input_stats(layer, data, i, names, lambda n, x: sq.__setitem__(n, sq.get(n, 0) + x.pow(2).sum(0)))
        with torch.no_grad():
            for n, lin in names.items():
                s = (lin.weight.abs() * sq[n].sqrt()[None]).view(lin.out_features, -1, 4)
                drop = s.topk(2, dim=-1, largest=False).indices
                lin.weight.view(lin.out_features, -1, 4).scatter_(-1, drop, 0.0)
        return {}

    def restore_layer(self, i, layer, tensors):  # pragma: no cover - no checkpointing here
        raise NotImplementedError


def _row(name: str, base, tok, spec, samples, opts: dict, cache: dict):
    """Returns (model, grid description, calibration seconds) for one row."""
    from accel.calibrate.gqsa import calibrate_gqsa
    from accel.calibrate.gqsa_opt import e2e_oqp
    from accel.calibrate.runner import run_layerwise
    from accel.configs.gqsa import GQSAConfig

    t0 = time.perf_counter()
    if name == "dense":
        return base, "fp32 weights (Q4_1-derived)", 0.0
    model = copy.deepcopy(base)
    if name == "rtn-w4-g64":
        # 128 divides neither 576 nor 1536; 64 is the closest size that does (2 Q4_1 blocks per group).
        _rtn(model, 4, 64)
        return model, "RTN int4 asym, g=64 (dense)", time.perf_counter() - t0
    if name == "rtn-w2-g16":
        _rtn(model, 2, 16)
        return model, "RTN int2 asym, g=16 (dense)", time.perf_counter() - t0
    if name == "wanda-2:4":
        run_layerwise(model, samples, _Wanda24(model), progress=False)
        return model, "fp32 weights, 2:4 (inline Wanda)", time.perf_counter() - t0
    if name.startswith("gqsa"):
        base_name = name.split("+")[0]
        m = re.fullmatch(r"gqsa-w(\d)s50-g(\d+)(?:-tile(\d+))?(-rtn|-uniform)?", base_name)
        if m is None:
            raise ValueError(f"unknown sweep row {name!r}; known: {', '.join(ROWS)}")
        bits, g, tile = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
        # "-rtn": the version-1 recipe (Wanda scores + RTN, uniform); "-uniform": OBS start, no OWL.
        init = "rtn" if m.group(4) == "-rtn" else "obs"
        alloc = "uniform" if m.group(4) else "owl"
        cfg = GQSAConfig(bits=bits, sparsity=0.5, group_size=g, tile_rows=tile, init=init, allocation=alloc,
                         bqpo_steps=opts["bqpo_steps"],
                         bqpo_batch=opts["bqpo_batch"], bqpo_lr=opts["bqpo_lr"])
        grid = f"int{bits} asym, g={g}{' (Q4_1-aligned)' if g % 32 == 0 or 32 % g == 0 else ' (not aligned)'}, " \
               f"50% groups pruned per {'row' if tile == 1 else f'{tile}-row tile'}, " \
               f"{'Wanda group scores + RTN start' if init == 'rtn' else 'OBS/GPTQ start'}, " \
               f"{'uniform over layers' if alloc == 'uniform' else f'OWL layer allocation (lambda {cfg.owl_lambda})'}"
        if name.endswith("+e2e") and base_name in cache:
            model, packed = cache[base_name]
            model = copy.deepcopy(model)
        else:
            art = calibrate_gqsa(model, tok, cfg, spec, samples=samples, progress=True,
                                 keep_changes=True)  # this row evaluates the calibrated model
            from accel.kernels.gqsa_linear.format import GQSAWeight
            packed = {n[len("gqsa/"):-len(".meta")]: None for n in art.tensors if n.endswith(".meta")}
            t = {k[len("gqsa/"):]: v for k, v in art.tensors.items()}
            packed = {n: GQSAWeight.from_tensors(t, n) for n in packed}
            cache[base_name] = (model, packed)
            if not name.endswith("+e2e"):
                return model, grid + ", stage 1 (BQPO)", time.perf_counter() - t0
            model = copy.deepcopy(model)
        # By keyword, with the config's guard (held-out early stopping): positionally the sweep's
        # stage 2 ran with holdout 0, unguarded, unlike `accel calibrate gqsa`.
        rec = {}
        e2e_oqp(model, packed, samples, steps=opts["e2e_steps"], lr=opts["e2e_lr"], batch=opts["e2e_batch"],
                tile_rows=tile, seed=spec.seed if spec is not None else 0, holdout=cfg.e2e_holdout,
                eval_every=cfg.e2e_eval_every, patience=cfg.e2e_patience, record=rec)
        guard = (f", held-out guard {cfg.e2e_holdout:g}: kept step {rec.get('kept_step')}/{rec.get('steps_run')}"
                 if rec.get("heldout_samples") else ", unguarded")
        return model, grid + f", stage 1+2 (E2E-OQP {opts['e2e_steps']} steps{guard})", time.perf_counter() - t0
    raise ValueError(f"unknown sweep row {name!r}; known: {', '.join(ROWS)}")


def gqsa_sweep(rows=ROWS, model_name: str = "smollm2-135m", max_tokens: int = 16384, seq_len: int = 512,
               n_samples: int = 32, calib_seq_len: int = 512, bqpo_steps: int = 8, bqpo_batch: int = 2,
               bqpo_lr: float = 3e-4, e2e_steps: int = 8, e2e_lr: float = 2e-5, e2e_batch: int = 2,
               progress: bool = True, on_row=None, eval_dtype: str = "float32", seed: int = 0,
               sources=("wiki",)) -> dict:
    """Perplexity of each row on `max_tokens` evaluation tokens of each corpus in `sources` (a row's
    "ppl" is the first corpus's, "ppl_sources" all of them); returns {"rows": [...], ...}."""
    import accel
    from accel.data import CalibrationSpec, bos_token_id, calibration_samples, eval_tokens

    from .perplexity import perplexity

    base, tok = accel.models.load(model_name)
    spec = CalibrationSpec(n_samples=n_samples, seq_len=calib_seq_len, seed=seed)
    samples = calibration_samples(tok, spec)
    sources = tuple(sources)
    if not sources:
        from accel.configs import ConfigError
        raise ConfigError("gqsa-sweep: --sources names no evaluation corpus")
    corpora = {src: eval_tokens(tok, src, max_tokens) for src in sources}
    bos = bos_token_id(tok)
    opts = dict(bqpo_steps=bqpo_steps, bqpo_batch=bqpo_batch, bqpo_lr=bqpo_lr, e2e_steps=e2e_steps,
                e2e_lr=e2e_lr, e2e_batch=e2e_batch)
    out, cache = [], {}
    for name in rows:
        model, grid, calib_s = _row(name, base, tok, spec, samples, opts, cache)
        if eval_dtype != "float32":
            # Calibration runs in fp32; evaluating in bf16 halves the CPU time (same ppl to ~2 decimals).
            model = (copy.deepcopy(model) if model is base else model).to(getattr(torch, eval_dtype))
        res = {src: perplexity(model, ids, seq_len=seq_len, progress=progress, desc=f"{name} {src}",
                               bos_token_id=bos) for src, ids in corpora.items()}
        r = res[sources[0]]
        row = {"row": name, "grid": grid, "ppl": r.ppl, "tokens": r.tokens, "calib_seconds": round(calib_s, 1),
               "ppl_sources": {src: x.ppl for src, x in res.items()}}
        log.info("%s: ppl %s (%s)", name, ", ".join(f"{k} {x.ppl:.3f}" for k, x in res.items()), grid)
        out.append(row)
        if on_row:
            on_row(row)
        if model is not base:
            del model
    return {"model": model_name, "tokens": out[0]["tokens"] if out else 0, "seq_len": seq_len, "eval_dtype": eval_dtype,
            "sources": list(sources),
            "calibration": {**spec.to_dict(), **opts}, "rows": out}


def demo_step(model, tok, ids: torch.Tensor, seq_len: int = 512) -> dict:
    """README demo: GQSA W4S50 in the default layout (g=16, groups chosen per row), stage 1 with 2
    BQPO steps on 16x256 calibration tokens (on a copy; fewer tokens leave OBS's 1536-wide Gram
    matrices rank-poor), save, patch `model`, print ppl on `ids`, unpatch. ~2 min on CPU."""
    import tempfile

    import accel
    from accel.calibrate.gqsa import calibrate_gqsa
    from accel.configs.gqsa import GQSAConfig
    from accel.data import CalibrationSpec

    from .perplexity import perplexity

    cfg = GQSAConfig(bits=4, sparsity=0.5, group_size=16, bqpo_steps=2, bqpo_batch=2)
    work = copy.deepcopy(model)
    t0 = time.perf_counter()
    art = calibrate_gqsa(work, tok, cfg, CalibrationSpec(n_samples=16, seq_len=256), progress=False)
    secs = time.perf_counter() - t0
    del work
    with tempfile.TemporaryDirectory() as d:
        art.save(f"{d}/gqsa")
        with accel.patched(model, f"{d}/gqsa"):
            path = accel.report(model).rows[0]["kernel"]
            r = perplexity(model, ids, seq_len=seq_len, desc="gqsa ppl")
    print(f"[gqsa] W4S50 g16 per-row (16x256 calibration tokens, 2 BQPO steps, {secs:.0f}s; CPU path "
          f"{path}): ppl {r.ppl:.3f} over {r.tokens} tokens")
    return {"gqsa_ppl": r.ppl, "gqsa_calibration_seconds": secs, "gqsa_path": path}
