"""DSnoT's sink guard (calibrate/dsnot.py `_SinkGuard`, prune_model(dsnot_sink_guard=True)).

On Qwen2.5-0.5B, DSnoT's swaps (fitted to the typical token) raised the error of the first token
of each sequence, the attention sink that carries massive activations, and wiki perplexity rose
(55.3 -> 61.7 at 60%). The guard vetoes any swap that raises a row's error on those tokens."""
import pytest
import torch

import accel
from accel.calibrate.dsnot import dsnot_refine
from accel.calibrate.prune import InputStats, prune_model
from accel.calibrate.wanda import wanda_mask
from accel.configs.prune import PruneConfig

G = lambda: torch.Generator().manual_seed(42)  # noqa: E731


def _sink_layer(samples=24, tps=25, out=37, n_in=120):
    """Inputs whose first token of each sample is atypical and large (an attention sink)."""
    g = G()
    w = torch.randn(out, n_in, generator=g)
    mix = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5 + torch.diag(torch.rand(n_in, generator=g))
    x = (torch.randn(samples, tps, n_in, generator=g) @ mix + torch.randn(n_in, generator=g))
    x[:, 0] = torch.randn(samples, n_in, generator=g) * 0.2 + 6 * torch.randn(n_in, generator=g).clamp_min(0)
    flat = x.reshape(-1, n_in)
    st = InputStats.zeros(n_in, gram=True)
    st.add(flat)
    st.add_sinks(flat, tps)
    return w, x, st, tps


def _err(w, keep, x):
    """Per row, squared reconstruction error summed over the given inputs x: [tokens, in] (fp64)."""
    return ((w.double() * ~keep) @ x.double().t()).pow(2).sum(1)


@pytest.mark.parametrize("objective", ["mse", "mean"])
def test_guard_never_raises_sink_error_and_still_refines(objective):
    w, x, st, tps = _sink_layer()
    assert torch.equal(st.sink_inputs, x[:, 0])
    keep0 = wanda_mask(w, st.sq, 0.6)
    gram = st.gram if objective == "mse" else None
    free = dsnot_refine(w, keep0, st.mean, st.var, st.sq, tps, objective=objective, gram=gram)
    r = dsnot_refine(w, keep0, st.mean, st.var, st.sq, tps, objective=objective, gram=gram, guard=st.sink_inputs)
    sinks = x[:, 0]
    e0, e_free, e_g = _err(w, keep0, sinks), _err(w, free.keep, sinks), _err(w, r.keep, sinks)
    # Without the guard DSnoT raises the sink error in some rows (the Qwen failure, in small).
    assert (e_free > e0 * (1 + 1e-6)).any()
    assert (e_g <= e0 * (1 + 1e-5) + 1e-6).all()
    assert r.swaps.sum() > 0
    assert torch.equal((~r.keep).sum(1), (~keep0).sum(1))
    if objective == "mse":
        # The objective's own promise still holds: no row's error on all tokens rises.
        flat = x.reshape(-1, x.size(-1))
        assert (_err(w, r.keep, flat) <= _err(w, keep0, flat) * (1 + 1e-6)).all()


def test_guard_shape_error():
    w, x, st, tps = _sink_layer()
    keep0 = wanda_mask(w, st.sq, 0.5)
    with pytest.raises(ValueError, match="guard must be"):
        dsnot_refine(w, keep0, st.mean, st.var, st.sq, tps, guard=x[:, 0, :10])


@pytest.mark.parametrize("mode", ["joined", "two-pass"])
def test_walk_sink_guard_layer0(mode):
    """Through prune_model: with the guard no linear of layer 0 has a higher error than Wanda's mask
    on the first-token inputs; without it the masks are those of a plain DSnoT run (default unchanged)."""
    x = torch.randint(0, 512, (6, 20), generator=G())
    model = accel.models.tiny("llama")
    layer = model.model.layers[0]
    lins = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    dense = {n: m.weight.detach().clone() for n, m in lins.items()}
    seen = {n: [] for n in lins}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen[n].append(i[0].detach()[:, 0]))
             for n, m in lins.items()]
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    for h in hooks:
        h.remove()
    cfg = PruneConfig(sparsity=0.6, dsnot=True)
    kw = dict(batch_size=3, progress=False, mode="two-pass", stop_after=1)
    wanda = prune_model(accel.models.tiny("llama"), PruneConfig(sparsity=0.6), x, **kw)
    assert cfg.dsnot_sink_guard is True  # the default since PruneConfig v3
    plain = prune_model(accel.models.tiny("llama"), PruneConfig(sparsity=0.6, dsnot=True, dsnot_sink_guard=False),
                        x, **kw)
    again = prune_model(accel.models.tiny("llama"), cfg, x, **kw, dsnot_sink_guard=False)
    kw["mode"] = mode
    guarded = prune_model(accel.models.tiny("llama"), cfg, x, **kw, dsnot_sink_guard=True)
    by_default = prune_model(accel.models.tiny("llama"), cfg, x, **kw)
    assert guarded.dsnot_swaps > 0
    assert all(torch.equal(plain.masks[k], again.masks[k]) for k in plain.masks)
    assert all(torch.equal(guarded.masks[k], by_default.masks[k]) for k in guarded.masks)
    # Every linear sees the dense layer's inputs in two-pass mode; in joined mode only q/k/v do
    # (the later ones see the already-pruned attention).
    names = [n for n in lins if mode == "two-pass" or n.endswith(("q_proj", "k_proj", "v_proj"))]
    for n in names:
        xs = torch.cat(seen[n])
        k0, k1 = wanda.masks[f"model.layers.0.{n}"], guarded.masks[f"model.layers.0.{n}"]
        assert (_err(dense[n], k1, xs) <= _err(dense[n], k0, xs) * (1 + 1e-5) + 1e-6).all(), n


def test_config_field_version_and_old_artifacts():
    """PruneConfig v3 carries the guard (default on); v1/v2 artifacts ran without it and load so."""
    from accel.configs import ConfigError, config_from_dict

    assert PruneConfig().dsnot_sink_guard is True and PruneConfig.version == 3
    for v in (1, 2):
        old = config_from_dict({"method": "prune", "version": v, "params": {"sparsity": 0.5, "dsnot": True}})
        assert old.dsnot_sink_guard is False
    with pytest.raises(ConfigError, match="dsnot_sink_guard must be true/false"):
        PruneConfig(dsnot_sink_guard="yes")
