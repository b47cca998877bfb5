"""GQSA stage-1 OBS/GPTQ initialisation: grid exactness, error vs Wanda+RTN, config versions."""

import pytest
import torch

import accel
from accel.calibrate.gqsa_obs import obs_group_prune_quant
from accel.calibrate.gqsa_opt import FakeQuantLinear
from accel.configs import ConfigError, config_from_dict
from accel.configs.gqsa import GQSAConfig
from accel.kernels.gqsa_linear.format import group_scores, select_groups
from accel.patches import compat


def _problem(out=48, n_in=96, tokens=512):
    g = torch.Generator().manual_seed(42)
    # Correlated inputs with uneven channel scales: where OBS has something to exploit.
    x = torch.randn(tokens, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)
    x = x * torch.rand(n_in, generator=g).mul(3).add(0.2)
    w = torch.randn(out, n_in, generator=g) * 0.05
    return w, x


def _rtn_reference(w, x, g, bits, sparsity):
    """Wanda group scores + per-group min/max round to nearest (the version-1 stage-1 start)."""
    cols = select_groups(group_scores(w, x.pow(2).sum(0).sqrt(), g), sparsity)
    lin = torch.nn.Linear(w.size(1), w.size(0), bias=False)
    lin.weight.data.copy_(w)
    return FakeQuantLinear(lin, cols, g, bits).export(1).dequantize()


@pytest.mark.parametrize("bits,g,sparsity", [(4, 16, 0.5), (3, 16, 0.5), (4, 32, 0.25), (2, 8, 0.75)],
                         ids=lambda v: str(v))
def test_obs_output_is_exactly_on_the_stored_grid(bits, g, sparsity):
    w, x = _problem()
    wq, cols, s, z = obs_group_prune_quant(w, x.T @ x, g, bits, sparsity)
    n_groups = w.size(1) // g
    k = n_groups - round(sparsity * n_groups)
    assert cols.shape == (w.size(0), k) and (cols.diff(dim=1) > 0).all()
    keep = torch.zeros(w.size(0), n_groups, dtype=torch.bool).scatter_(1, cols, True)
    wg = wq.view(w.size(0), n_groups, g)
    assert (wg[~keep] == 0).all()
    # Packing (fp16 scale/zero, integer codes) reproduces the OBS weights.
    lin = torch.nn.Linear(w.size(1), w.size(0), bias=False)
    packed = FakeQuantLinear(lin, cols, g, bits, scale=s, zero=z, init_weight=wq).export(1)
    assert torch.allclose(packed.dequantize(), wq, atol=1e-6, rtol=0)
    assert int(packed.codes().max()) <= 2 ** bits - 1


@pytest.mark.parametrize("bits,sparsity", [(4, 0.5), (3, 0.5), (4, 0.25)], ids=lambda v: str(v))
def test_obs_lowers_layer_output_error_vs_wanda_rtn(bits, sparsity):
    w, x = _problem()
    wq, *_ = obs_group_prune_quant(w, x.T @ x, 16, bits, sparsity)
    err_obs = (x @ (w - wq).T).pow(2).sum()
    err_rtn = (x @ (w - _rtn_reference(w, x, 16, bits, sparsity)).T).pow(2).sum()
    assert err_obs < 0.8 * err_rtn, (err_obs.item(), err_rtn.item())


def test_obs_dense_8bit_is_nearly_exact():
    w, x = _problem()
    wq, cols, _, _ = obs_group_prune_quant(w, x.T @ x, 16, 8, 0.0)
    assert cols.size(1) == w.size(1) // 16
    assert ((x @ (w - wq).T).norm() / (x @ w.T).norm()).item() < 1e-2


def test_obs_handles_dead_input_channels():
    w, x = _problem()
    x[:, 5] = 0.0
    wq, *_ = obs_group_prune_quant(w, x.T @ x, 16, 4, 0.5)
    assert torch.isfinite(wq).all() and (wq[:, 5] == 0).all()


def test_config_init_and_version_upgrade():
    with pytest.raises(ConfigError, match="init='gptq'"):
        GQSAConfig(init="gptq")
    assert GQSAConfig().init == "obs"
    old = config_from_dict({"method": "gqsa", "version": 1, "params": {"bits": 4, "sparsity": 0.5}})
    assert old.init == "rtn"
    with pytest.raises(ConfigError, match="version 9"):
        config_from_dict({"method": "gqsa", "version": 9, "params": {}})


@pytest.mark.parametrize("row,start", [("gqsa-w4s50-g16", "OBS/GPTQ start"), ("gqsa-w3s50-g32-rtn", "RTN start")])
def test_sweep_rows_name_their_stage1_start(row, start):
    from accel.eval.sweep_gqsa import _row

    base = accel.models.tiny("llama")
    x = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(42))
    opts = dict(bqpo_steps=0, bqpo_batch=2, bqpo_lr=3e-4, e2e_steps=0, e2e_lr=2e-5, e2e_batch=2)
    model, grid, _ = _row(row, base, None, None, x, opts, {})
    assert start in grid and model is not base
    with pytest.raises(ValueError, match="unknown sweep row"):
        _row("gqsa-w4s50-gx", base, None, None, x, opts, {})


def test_owl_sparsities_keep_the_mean_and_favour_outlier_layers():
    from accel.calibrate.owl import owl_sparsities

    ratios = {0: 0.012, 1: 0.004, 2: 0.005, 3: 0.009}
    s = owl_sparsities(ratios, 0.5, 0.2)
    assert abs(sum(s.values()) / 4 - 0.5) < 1e-9
    assert s[0] == min(s.values()) and s[1] == max(s.values())
    assert abs((s[1] - s[0]) - 0.4) < 1e-9  # the spread is 2·lambda
    # lambda is capped so every layer stays in [0, 1); equal ratios give the uniform allocation.
    hi = owl_sparsities(ratios, 0.9, 0.5)
    assert all(0.0 <= v < 1.0 for v in hi.values()) and abs(sum(hi.values()) / 4 - 0.9) < 1e-9
    assert owl_sparsities({0: 0.1, 1: 0.1}, 0.5, 0.2) == {0: 0.5, 1: 0.5}


def test_calibrate_with_owl_allocation_varies_layers_and_keeps_the_mean():
    from accel.calibrate.gqsa import calibrate_gqsa

    model = accel.models.tiny("llama")
    x = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(42))
    cfg = GQSAConfig(bits=4, sparsity=0.5, group_size=8, allocation="owl", owl_lambda=0.2, bqpo_steps=0)
    art = calibrate_gqsa(model, None, cfg, samples=x, progress=False)
    ls = art.calibration["layer_sparsity"]
    assert len(ls) == len(compat.decoder_layers(model)) and len(set(ls.values())) > 1
    assert abs(sum(ls.values()) / len(ls) - 0.5) < 1e-3
    assert abs(art.calibration["model_sparsity"] - 0.5) < 0.05
    uni = calibrate_gqsa(accel.models.tiny("llama"), None, GQSAConfig(bits=4, sparsity=0.5, group_size=8,
                         allocation="uniform", bqpo_steps=0), samples=x, progress=False)
    assert uni.calibration["layer_sparsity"] == {} and abs(uni.calibration["model_sparsity"] - 0.5) < 1e-9


def test_config_allocation_checks():
    with pytest.raises(ConfigError, match="allocation='owl2'"):
        GQSAConfig(allocation="owl2")
    with pytest.raises(ConfigError, match="owl_lambda"):
        GQSAConfig(owl_lambda=1.5)
    old = config_from_dict({"method": "gqsa", "version": 1, "params": {"bits": 4}})
    assert old.allocation == "uniform"
