"""Double Sparsity's evaluation mode (every query row sparse, a forward without a cache): the
native CPU pass (accel/kernels/ds_attention/causal_cpp.py) and the torch chunk path, each against
the spec (a decode step per row, fp64), on odd shapes with left padding, both group reductions,
budgets below and above a row's keys, the r = 16 / D = 64 specialisations and other sizes."""
import pytest
import torch

from accel.kernels.ds_attention import causal_cpp, ds_causal_attention, ds_causal_attention_reference, gather_labels
from kernel_tolerances import assert_within, rel_err

needs_native = pytest.mark.skipif(causal_cpp.load() is None, reason="no C++ compiler (ACCEL_CPP=0)")


def _inputs(B, KVH, G, T, D, r, pad, dtype):
    g = torch.Generator().manual_seed(42)
    q = torch.randn(B, KVH * G, T, D, generator=g)
    k, v = torch.randn(B, KVH, T, D, generator=g), torch.randn(B, KVH, T, D, generator=g)
    ch = torch.stack([torch.randperm(D, generator=g)[:r] for _ in range(KVH)])
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T).clone()
    allowed[-1, :, :pad] = False
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v, gather_labels(k, ch), ch, allowed


def _check(out, q, k, v, lab, ch, budget, reduce, allowed, dtype, what):
    ref = ds_causal_attention_reference(q.double(), k.double(), v.double(), lab.double(), ch, budget, 2, 5, None,
                                        reduce, allowed)
    rows = allowed.any(-1)  # a padded query row sees no key: unspecified
    assert torch.isfinite(out).all() and out.dtype == q.dtype
    for b in range(q.shape[0]):
        assert_within(rel_err(out[b][:, rows[b]], ref[b][:, rows[b]]), 0.0, dtype, q.shape[-1],
                      what=f"{what} batch {b}")


SHAPES = [  # B, KVH, G, T, D, r
    pytest.param(2, 3, 3, 63, 64, 16, id="smollm2-like-T63"),
    pytest.param(1, 2, 7, 130, 24, 3, id="odd-D24-r3-T130"),
    pytest.param(2, 1, 4, 33, 256, 16, id="mqa-D256-T33"),
]


@needs_native
@pytest.mark.parametrize("reduce", ["max", "sum"])
@pytest.mark.parametrize("B, KVH, G, T, D, r", SHAPES)
def test_native_pass_matches_the_spec(B, KVH, G, T, D, r, reduce):
    q, k, v, lab, ch, allowed = _inputs(B, KVH, G, T, D, r, pad=5, dtype=torch.float32)
    for budget in (9, T + 7):
        out = ds_causal_attention(q, k, v, lab, ch, budget, 2, 5, None, reduce, allowed)
        _check(out, q, k, v, lab, ch, budget, reduce, allowed, torch.float32, f"budget {budget}")


@needs_native
def test_native_pass_in_bf16_matches_the_spec():
    q, k, v, lab, ch, allowed = _inputs(2, 3, 3, 63, 64, 16, pad=4, dtype=torch.bfloat16)
    out = ds_causal_attention(q, k, v, lab, ch, 12, 2, 5, None, "max", allowed)
    _check(out, q, k, v, lab, ch, 12, "max", allowed, torch.bfloat16, "bf16")


@needs_native
def test_native_selection_is_the_reference_selection():
    """The chosen keys themselves (not only the output): the forced sink and recent keys of every
    row and the top-scoring others, as select_rows_reference picks them (random scores: no ties)."""
    from accel.kernels.ds_attention.reference import row_scores_reference, select_rows_reference

    q, k, v, lab, ch, allowed = _inputs(2, 3, 3, 63, 64, 16, pad=6, dtype=torch.float32)
    got = causal_cpp.select_rows(causal_cpp.load(), q, lab, ch, "max", allowed, 11, 2, 5)
    want = select_rows_reference(row_scores_reference(q, lab, ch, "max"), allowed, 11, 2, 5)
    ok = allowed[:, None].expand(-1, 3, -1, -1)
    for b in range(2):
        for h in range(3):
            for i in range(63):
                g = {t for t in got[b, h, i].tolist() if ok[b, h, i, t]}
                w = {t for t in want[b, h, i].tolist() if ok[b, h, i, t]}
                assert g == w, (b, h, i)


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_torch_chunk_path_matches_the_spec(reduce, monkeypatch):
    """Without the native pass (no compiler, GPU tensors): chunked torch selection + masked SDPA."""
    monkeypatch.setattr(causal_cpp, "load", lambda: None)
    q, k, v, lab, ch, allowed = _inputs(2, 3, 3, 63, 64, 16, pad=5, dtype=torch.float32)
    for budget in (9, 80):
        out = ds_causal_attention(q, k, v, lab, ch, budget, 2, 5, None, reduce, allowed, max_elems=2 * 9 * 63 * 5)
        _check(out, q, k, v, lab, ch, budget, reduce, allowed, torch.float32, f"budget {budget}")
