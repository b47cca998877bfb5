"""`accel eval gqsa-sweep`'s "+e2e" rows run stage 2 (E2E-OQP) with the held-out guard of the
GQSA config, as `accel calibrate gqsa` does (they called it positionally: holdout 0, unguarded)."""
import inspect

import torch

import accel
from accel.calibrate import gqsa_opt
from accel.configs.gqsa import GQSAConfig


def test_sweep_e2e_row_runs_the_guarded_stage2(monkeypatch):
    from accel.eval.sweep_gqsa import _row

    real, seen = gqsa_opt.e2e_oqp, []

    def spy(*a, **k):
        b = inspect.signature(real).bind(*a, **k)
        b.apply_defaults()
        seen.append(dict(b.arguments))
        return real(*a, **k)

    monkeypatch.setattr(gqsa_opt, "e2e_oqp", spy)
    base = accel.models.tiny("llama")
    x = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(42))
    opts = dict(bqpo_steps=0, bqpo_batch=2, bqpo_lr=3e-4, e2e_steps=2, e2e_lr=2e-5, e2e_batch=2)
    model, grid, _ = _row("gqsa-w4s50-g16-rtn+e2e", base, None, None, x, opts, {})
    # The calibration's own stage 2 (e2e_steps 0 there) and the sweep's: both guarded.
    cfg = GQSAConfig()
    sweep = seen[-1]
    assert sweep["steps"] == 2 and sweep["holdout"] == cfg.e2e_holdout > 0, sweep
    assert (sweep["eval_every"], sweep["patience"]) == (cfg.e2e_eval_every, cfg.e2e_patience)
    assert "held-out guard 0.125" in grid, grid
    # The function's own default is the guarded one too.
    assert inspect.signature(real).parameters["holdout"].default == cfg.e2e_holdout


def test_sweep_measures_every_row_on_each_corpus(smollm2, monkeypatch):
    """Issue 16: a claim that one method beats another must hold on a second corpus too; before,
    the sweep measured wiki only."""
    from accel.data import eval_tokens
    from accel.eval.perplexity import perplexity
    from accel.eval.sweep_gqsa import gqsa_sweep

    model, tok = smollm2
    monkeypatch.setattr(accel.models, "load", lambda *a, **k: (model, tok))
    res = gqsa_sweep(["dense"], max_tokens=512, seq_len=256, progress=False, sources=("wiki", "shakespeare"))
    row = res["rows"][0]
    assert res["sources"] == ["wiki", "shakespeare"] and set(row["ppl_sources"]) == {"wiki", "shakespeare"}
    direct = perplexity(model, eval_tokens(tok, "shakespeare", 512), seq_len=256, progress=False).ppl
    assert abs(row["ppl_sources"]["shakespeare"] - direct) <= 1e-6 * direct
    assert row["ppl"] == row["ppl_sources"]["wiki"] and abs(row["ppl"] - direct) > 1.0
