"""`accel.report` totals (fast: tiny models only)."""
import pytest

import accel


# --------------------------------------------------------------------------------------------
# accel.report totals, against bytes computed by hand for the tiny llama
# (hidden 64, intermediate 128, 4 layers, 4 heads x 16, 2 KV heads; no biases)
# --------------------------------------------------------------------------------------------
def test_report_totals_gqsa_bytes_by_hand():
    from accel.calibrate.gqsa import rtn_artifact
    from accel.configs.gqsa import GQSAConfig

    model = accel.models.tiny("llama")
    art = rtn_artifact(model, GQSAConfig(bits=4, sparsity=0.5, group_size=16, targets=["q_proj"]))
    with accel.patched(model, art):
        rep = accel.report(model)
        t = rep.totals()
        text = str(rep)
    # q_proj 64 -> 64: 4 groups of 16 per row, 2 kept. Codes 2 x 16 x 4 bit = 16 B/row, colmask
    # ceil(4/8) = 1 B/row, fp16 scale + zero per kept group = 8 B/row: 25 B x 64 rows = 1600 B.
    # Dense bf16: 64 x 64 x 2 = 8192 B. Four layers.
    assert (t.linears, t.weight_bytes, t.dense_bf16_bytes) == (4, 4 * 1600, 4 * 8192)
    assert t.ratio == pytest.approx(1600 / 8192)
    assert sum(t.kernels.values()) == 4 and len(t.kernels) == 1
    assert "total: 4 linears store 6,400 bytes vs 32,768 dense bf16 (0.195x)" in text
    assert text.splitlines()[-1] == f"modules per kernel path: {next(iter(t.kernels))} 4"


def test_report_totals_prune_fp32_is_twice_bf16(tmp_path):
    from accel.calibrate.prune_cli import calibrate_prune

    calibrate_prune(str(tmp_path / "art"), init="magnitude", model=accel.models.tiny("llama"),
                    model_name="tiny-llama", sparsity=0.5, targets=["re:mlp\\."], progress=False)
    model = accel.models.tiny("llama")  # fp32: a masked dense weight stores 4 bytes a weight
    with accel.patched(model, tmp_path / "art"):
        t = accel.report(model).totals()
        text = str(accel.report(model))
    # gate/up 64 -> 128 and down 128 -> 64: 3 x 8192 weights a layer, 4 layers = 98,304 weights.
    assert (t.linears, t.weight_bytes, t.dense_bf16_bytes) == (12, 98304 * 4, 98304 * 2)
    assert t.ratio == 2.0 and t.kernels == {"dense-masked": 12}
    assert text.splitlines()[-2:] == ["total: 12 linears store 393,216 bytes vs 196,608 dense bf16 (2.000x)",
                                      "modules per kernel path: dense-masked 12"]


def test_report_of_an_unpatched_model_has_no_totals():
    model = accel.models.tiny("llama")
    rep = accel.report(model)
    assert str(rep) == "model is not patched by accel"
    t = rep.totals()
    assert (t.linears, t.weight_bytes, t.kernels, t.ratio) == (0, 0, {}, None)
