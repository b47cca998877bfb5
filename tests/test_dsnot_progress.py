"""DSnoT cost and progress (issue 16): X^T X once per distinct input and by its symmetric half,
a log line per layer, and unchanged masks."""
import logging

import torch

import accel
from accel.calibrate import prune as prune_mod
from accel.calibrate.prune import InputStats, prune_model
from accel.configs.prune import PruneConfig

G = lambda: torch.Generator().manual_seed(42)  # noqa: E731


def test_gram_fp32_equals_full_product_odd_width():
    from accel.calibrate.dsnot import gram_fp32

    x = torch.randn(63, 1000, generator=G())
    ref = x.double().t() @ x.double()
    got = gram_fp32(x, block=128)
    assert got.shape == (1000, 1000) and got.dtype == torch.float32
    assert torch.equal(got, got.t())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


def _count_adds(monkeypatch):
    calls = []
    orig = InputStats.add

    def add(self, x):
        calls.append((id(self), x.size(1)))
        return orig(self, x)
    monkeypatch.setattr(InputStats, "add", add)
    return calls


def test_two_pass_accumulates_each_shared_input_once(monkeypatch):
    """q/k/v (and gate/up) see one tensor: its X^T X (the expensive part) is accumulated once per
    chunk, not once per linear; the masks are those of separate per-linear statistics."""
    x = torch.randint(0, 512, (4, 24), generator=G())
    cfg = PruneConfig(sparsity=0.6, dsnot=True)
    ref = prune_model(accel.models.tiny("llama"), cfg, x, batch_size=2, progress=False, mode="two-pass")
    calls = _count_adds(monkeypatch)
    # Two chunks of 2 samples: per layer and chunk, 4 distinct inputs (q/k/v, o, gate/up, down).
    info = prune_model(accel.models.tiny("llama"), cfg, x, batch_size=2, progress=False, mode="two-pass")
    assert len(calls) == 4 * 2 * 4, len(calls)
    assert info.masks.keys() == ref.masks.keys()
    for n in ref.masks:
        assert torch.equal(info.masks[n], ref.masks[n]), n


def test_two_pass_shared_stats_equal_separate_stats():
    """The shared InputStats hold exactly what one InputStats per linear would."""
    model = accel.models.tiny("llama")
    x = torch.randint(0, 512, (3, 20), generator=G())
    layer = model.model.layers[0]
    lins = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    from accel.calibrate.runner import capture_inputs, linear_input_stats

    data = capture_inputs(model, x, batch_size=2)
    sep = {n: InputStats.zeros(m.in_features, True) for n, m in lins.items()}
    linear_input_stats(layer, data, 0, lins, lambda n, t: sep[n].add(t), early_exit=True)
    pruner = prune_mod._LayerPruner(PruneConfig(dsnot=True), {}, 20, prune_mod.PruneInfo())
    shared = pruner._shared_stats_pass(0, layer, data, lins)
    assert shared["self_attn.q_proj"] is shared["self_attn.v_proj"] is shared["self_attn.k_proj"]
    assert shared["mlp.gate_proj"] is shared["mlp.up_proj"]
    assert shared["mlp.down_proj"] is not shared["mlp.up_proj"]
    for n in lins:
        assert shared[n].count == sep[n].count, n
        for a in ("total", "sq", "xtx"):
            torch.testing.assert_close(getattr(shared[n], a), getattr(sep[n], a), rtol=0, atol=0)


def test_dsnot_logs_a_line_per_layer(caplog):
    x = torch.randint(0, 512, (2, 16), generator=G())
    with caplog.at_level(logging.INFO, logger="accel.calibrate.prune"):
        prune_model(accel.models.tiny("llama"), PruneConfig(sparsity=0.5, dsnot=True), x, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DSnoT layer")]
    assert [ln.split(":")[0] for ln in lines] == [f"DSnoT layer {i}" for i in range(4)], lines
    assert all("swaps" in ln and "cycles" in ln for ln in lines)
