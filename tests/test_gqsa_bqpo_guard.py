"""GQSA (issue 16): BQPO never keeps a step that raises the block error, measured on fixed
samples; E2E-OQP's held-out guard keeps the best held-out scales/zeros; config version 3."""
import logging

import pytest
import torch

import accel
from accel.calibrate.gqsa_opt import FakeQuantLinear, _swap, bqpo_block, e2e_oqp, split_holdout
from accel.calibrate.runner import capture_inputs
from accel.configs import ConfigError
from accel.configs.base import config_from_dict
from accel.configs.gqsa import GQSAConfig
from accel.kernels.gqsa_linear.format import pack_weight
from accel.patches import compat
from accel.patches.targets import iter_linears

G = lambda: torch.Generator().manual_seed(42)  # noqa: E731


def _block_setup():
    """Layer 0 of a tiny Llama with RTN group-sparse FakeQuantLinears swapped in; its inputs,
    the dense block's outputs and the layer kwargs."""
    from accel.calibrate.gqsa import GQSALayerMethod

    model = accel.models.tiny("llama")
    x = torch.randint(0, 512, (6, 24), generator=G())
    data = capture_inputs(model, x, batch_size=3)
    layer = compat.decoder_layers(model)[0]
    tgt = torch.cat(data.forward(layer, 0))
    cfg = GQSAConfig(bits=3, sparsity=0.5, group_size=16, init="rtn", allocation="uniform", bqpo_steps=0)
    meth = GQSALayerMethod(model, cfg)
    _, fq = meth._init_rtn(cfg, 0, layer, data, meth._names(0))
    for rel, m in fq.items():
        _swap(layer, rel, m)
    return layer, fq, torch.cat(data.hidden), tgt, lambda b: data.kwargs_for(0, b, "cpu")


def _err(layer, inputs, tgt, kw):
    with torch.no_grad():
        y = layer(inputs, **kw(inputs.size(0)))
    y = y[0] if isinstance(y, (tuple, list)) else y
    return (y.double() - tgt.double()).pow(2).mean().item()


def test_bqpo_too_large_lr_never_keeps_a_worse_block():
    layer, fq, inputs, tgt, kw = _block_setup()
    e0 = _err(layer, inputs, tgt, kw)
    # lr 0.5: Adam's first steps throw the weights, scales and zeros far off (the block error rises).
    before, kept = bqpo_block(layer, fq, inputs, tgt, kw, 6, 0.5, 2, 0)
    e1 = _err(layer, inputs, tgt, kw)
    assert e1 <= e0 * (1 + 1e-5), (e0, e1)
    # What it reports is the error on the same samples (here all of them), before and kept.
    assert before == pytest.approx(e0, rel=1e-4) and kept == pytest.approx(e1, rel=1e-4)


def test_bqpo_keep_best_false_keeps_the_raised_last_step():
    """Shows the test above can fail: the same run keeping its last step ends worse."""
    layer, fq, inputs, tgt, kw = _block_setup()
    e0 = _err(layer, inputs, tgt, kw)
    before, last = bqpo_block(layer, fq, inputs, tgt, kw, 6, 0.5, 2, 0, keep_best=False)
    assert last > e0 and _err(layer, inputs, tgt, kw) == pytest.approx(last, rel=1e-4)


def test_bqpo_small_lr_still_improves_and_logs_same_sample_errors(caplog):
    layer, fq, inputs, tgt, kw = _block_setup()
    e0 = _err(layer, inputs, tgt, kw)
    with caplog.at_level(logging.INFO, logger="accel.calibrate.gqsa_opt"):
        before, kept = bqpo_block(layer, fq, inputs, tgt, kw, 20, 1e-3, 2, 0, "layer 0", eval_samples=4)
    assert kept < before and _err(layer, inputs, tgt, kw) < e0
    assert any("block MSE on 4 fixed samples" in r.getMessage() for r in caplog.records)


def _packed_tiny():
    model = accel.models.tiny("llama")
    packed = {}
    with torch.no_grad():
        for name, lin in iter_linears(model, None, []):
            packed[name] = pack_weight(lin.weight, sparsity=0.5, group_size=16, bits=3)
            lin.weight.copy_(packed[name].dequantize())
    return model, packed


def _held_loss(model, held):
    with torch.no_grad():
        return model(input_ids=held, labels=held, use_cache=False).loss.item()


def test_e2e_guard_keeps_best_held_out_state_and_stops_early():
    x = torch.randint(0, 512, (8, 24), generator=G())
    train, held = split_holdout(x, 0.25, 0)
    assert held.size(0) == 2 and train.size(0) == 6
    assert not set(map(tuple, held.tolist())) & set(map(tuple, train.tolist()))
    # Overfitting made certain: the training rows are one repeated text, the held-out rows another.
    is_held = (x.unsqueeze(1) == held.unsqueeze(0)).all(-1).any(1)
    x[~is_held] = torch.arange(24)
    x[is_held] = torch.arange(300, 324)
    held = x[is_held]
    model, packed = _packed_tiny()
    l0 = _held_loss(model, held)
    rec = {}
    e2e_oqp(model, packed, x, 24, 0.02, 2, 1, progress=False, holdout=0.25, eval_every=4, patience=2, record=rec)
    assert _held_loss(model, held) <= l0 + 1e-4, (l0, rec)
    assert rec["steps_run"] < 24 and rec["heldout_samples"] == 2
    assert rec["heldout_loss"][0][1] == pytest.approx(l0, abs=1e-3)
    assert rec["kept_step"] == 0 and max(v for _, v in rec["heldout_loss"]) > l0
    # Without the guard, the same training (on the same training rows) ends worse on the held-out ones.
    model2, packed2 = _packed_tiny()
    e2e_oqp(model2, packed2, x[~is_held], 24, 0.02, 2, 1, progress=False, holdout=0.0)
    assert _held_loss(model2, held) > l0 + 0.02


def test_gqsa_config_v3_fields_and_upgrade():
    c = GQSAConfig()
    assert (c.bqpo_keep_best, c.bqpo_eval_samples, c.e2e_holdout, c.e2e_eval_every, c.e2e_patience) == \
        (True, 8, 0.125, 16, 2)
    old = {k: v for k, v in GQSAConfig().to_dict()["params"].items()
           if k not in ("bqpo_keep_best", "bqpo_eval_samples", "e2e_holdout", "e2e_eval_every", "e2e_patience")}
    up = config_from_dict({"method": "gqsa", "version": 2, "params": old})
    assert (up.bqpo_keep_best, up.bqpo_eval_samples, up.e2e_holdout) == (False, 0, 0.0)
    for bad, msg in [(dict(bqpo_eval_samples=-1), "bqpo_eval_samples"), (dict(e2e_holdout=1.0), "e2e_holdout"),
                     (dict(e2e_eval_every=0), "e2e_eval_every"), (dict(e2e_patience=0), "e2e_patience")]:
        with pytest.raises(ConfigError, match=msg):
            GQSAConfig(**bad)


def test_bqpo_measures_every_k_steps_and_keeps_a_measured_snapshot(monkeypatch):
    """The guard's cost: the block error is measured before training, every k steps (default
    ceil(eval samples / batch)) and after the last, not after every step; what is kept is the
    best measured snapshot, and the block ends with exactly that error on the fixed samples."""
    from accel.calibrate import gqsa_opt

    seen = []
    real = gqsa_opt._block_error
    monkeypatch.setattr(gqsa_opt, "_block_error", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    layer, fq, inputs, tgt, kw = _block_setup()
    # 4 fixed samples, batch 2: measured after steps 0, 2, 4, 6, 7 (was: the start and all 7 steps).
    before, kept = bqpo_block(layer, fq, inputs, tgt, kw, 7, 0.5, 2, 0, eval_samples=4)
    assert len(seen) == 5, seen
    assert gqsa_opt.eval_steps(7, 2) == [0, 2, 4, 6, 7] and gqsa_opt.bqpo_eval_every(4, 2) == 2
    assert before == seen[0] and kept == min(seen)
    ev = gqsa_opt.eval_indices(inputs.size(0), 4, 0)
    assert real(layer, inputs, tgt, ev, kw, 8) == pytest.approx(kept, rel=1e-5)
    # An explicit eval_every, and keep_best=False measures only the two ends.
    seen.clear()
    layer, fq, inputs, tgt, kw = _block_setup()
    bqpo_block(layer, fq, inputs, tgt, kw, 8, 1e-3, 2, 0, eval_samples=4, eval_every=4)
    assert len(seen) == 3
    seen.clear()
    layer, fq, inputs, tgt, kw = _block_setup()
    bqpo_block(layer, fq, inputs, tgt, kw, 8, 1e-3, 2, 0, eval_samples=4, keep_best=False)
    assert len(seen) == 2
    with pytest.raises(ValueError, match="eval_every"):
        bqpo_block(layer, fq, inputs, tgt, kw, 2, 1e-3, 2, 0, eval_every=0)
