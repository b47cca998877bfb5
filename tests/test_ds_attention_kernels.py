"""Double Sparsity decode-attention kernels (Triton under TRITON_INTERPRET=1, fast CPU path) against
the torch reference, on odd shapes: T in {63, 1000, 4097}, GQA ratio in {1, 3, 4}, head_dim 64/128.

Error bound (guide): a kernel's relative error against an fp64 computation over the *same selected
tokens* must be <= 2x the error of a plain torch computation in the input dtype, with an absolute
floor of a few ulps x sqrt(reduction length) (tests/kernel_tolerances.py) so that another CPU's
summation order cannot fail it."""
import pytest
import torch

from accel.kernels.ds_attention import (dense_decode_reference, ds_attend_reference, ds_decode_attention,
                                        ds_select_reference)
from accel.kernels.ds_attention import cpu as ds_cpu
from accel.kernels.ds_attention import triton_kernel as ds_triton
from kernel_tolerances import assert_within
from ds_kernel_inputs import (KVH, RECENT, SHAPES, SINK, assert_attend_within, assert_same_selection,
                              budget_for, make_inputs, rel_err, shape_id, torch_same_dtype_attend)


SELECTORS = {"cpu": ds_cpu.ds_select_cpu, "triton": ds_triton.ds_select_triton}


@pytest.mark.parametrize("path", ["cpu", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_selection_matches_reference(path, shape):
    T, G, D = shape
    q, k, v, labels, channels = make_inputs(T, G, D)
    budget = budget_for(T)
    idx = SELECTORS[path](q, labels, channels, budget, SINK, RECENT, "max", None)
    assert_same_selection(idx, q, labels, channels, budget)
    sel = set(idx[0, 0].tolist())
    assert set(range(SINK)) <= sel and set(range(T - RECENT, T)) <= sel


def _attend_cpu_torch(*args, **kwargs):
    """The CPU path without its optional C++ kernel (what runs where no compiler is present)."""
    from unittest import mock

    with mock.patch.object(ds_cpu.cpp_ext, "load", lambda: None):
        return ds_cpu.ds_attend_cpu(*args, **kwargs)


ATTENDERS = {"cpu": ds_cpu.ds_attend_cpu, "cpu-torch": _attend_cpu_torch, "triton": ds_triton.ds_attend_triton}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("path", ["cpu", "cpu-torch", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_attend_error_within_2x_torch(path, shape, dtype):
    T, G, D = shape
    q, k, v, labels, channels = make_inputs(T, G, D, dtype)
    idx = ds_select_reference(q, labels, channels, budget_for(T), SINK, RECENT)
    exact = ds_attend_reference(q.double(), k.double(), v.double(), idx)
    torch_err = rel_err(torch_same_dtype_attend(q, k, v, idx), exact)
    out = ATTENDERS[path](q, k, v, idx)
    assert out.dtype == dtype and out.shape == q.shape
    assert_attend_within(out, exact, torch_err, idx, path)


@pytest.mark.parametrize("path", ["cpu", "triton"])
def test_bf16_upcast(path):
    """bf16 is silently wrong under the interpreter unless the kernel upcasts after every load."""
    q, k, v, labels, channels = make_inputs(1000, 4, 64, torch.bfloat16)
    idx = ds_select_reference(q, labels, channels, 125, SINK, RECENT)
    exact = ds_attend_reference(q.double(), k.double(), v.double(), idx)
    torch_err = rel_err(torch_same_dtype_attend(q, k, v, idx), exact)
    assert_attend_within(ATTENDERS[path](q, k, v, idx), exact, torch_err, idx, path)


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "sum"])
@pytest.mark.parametrize("split", [16, 48, 4096], ids=lambda s: f"split{s}")
def test_triton_split_k(split, use_dot):
    """Several splits with a ragged last one, and the reduce kernel, against fp64."""
    q, k, v, labels, channels = make_inputs(1000, 3, 64)
    idx = ds_select_reference(q, labels, channels, 125, SINK, RECENT)
    exact = ds_attend_reference(q.double(), k.double(), v.double(), idx)
    out = ds_triton.ds_attend_triton(q, k, v, idx, split=split, block_n=16, use_dot=use_dot)
    assert_attend_within(out, exact, rel_err(torch_same_dtype_attend(q, k, v, idx), exact), idx)


@pytest.mark.parametrize("path", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_end_to_end(path, reduce):
    q, k, v, labels, channels = make_inputs(1000, 4, 128)
    out, idx = ds_decode_attention(q, k, v, labels, channels, 125, SINK, RECENT, group_reduce=reduce,
                                   path=path, return_indices=True)
    ref_idx = ds_select_reference(q.double(), labels.double(), channels, 125, SINK, RECENT, reduce)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    exact = ds_attend_reference(q.double(), k.double(), v.double(), ref_idx)
    assert_attend_within(out, exact, rel_err(torch_same_dtype_attend(q, k, v, ref_idx), exact), ref_idx)


@pytest.mark.parametrize("path", ["reference", "cpu", "triton"])
def test_full_budget_is_dense(path):
    """budget >= T: exactly dense attention (checked against SDPA, independent of our code)."""
    q, k, v, labels, channels = make_inputs(63, 3, 64)
    out = ds_decode_attention(q, k, v, labels, channels, 100, path=path)
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    assert rel_err(out, dense) < 1e-5


@pytest.mark.parametrize("path", ["reference", "cpu", "triton"])
def test_left_padding_equals_unpadded_rows(path):
    """Batch 2, row 1 left-padded by 37: each row must equal the same row run alone, unpadded."""
    q, k, v, labels, channels = make_inputs(300, 3, 64, B=2)
    pad = 37
    key_mask = torch.ones(2, 300, dtype=torch.bool)
    key_mask[1, :pad] = False
    k[1, :, :pad] = 1e4   # padded garbage must not leak
    labels[1, :, :pad] = 1e4
    out, idx = ds_decode_attention(q, k, v, labels, channels, 40, SINK, RECENT, key_mask=key_mask, path=path,
                                   return_indices=True)
    assert (idx[1] >= pad).all()
    for b, p in ((0, 0), (1, pad)):
        alone = ds_decode_attention(q[b:b + 1], k[b:b + 1, :, p:], v[b:b + 1, :, p:], labels[b:b + 1, :, p:],
                                    channels, 40, SINK, RECENT, path="reference")
        assert rel_err(out[b:b + 1], alone.double()) < 1e-5


@pytest.mark.parametrize("path", ["reference", "cpu", "triton"])
def test_fewer_valid_tokens_than_budget(path):
    """Row 1 has 20 valid tokens and a budget of 32: dense over those 20, padding masked."""
    q, k, v, labels, channels = make_inputs(64, 4, 64, B=2)
    key_mask = torch.ones(2, 64, dtype=torch.bool)
    key_mask[1, :44] = False
    out = ds_decode_attention(q, k, v, labels, channels, 32, SINK, RECENT, key_mask=key_mask, path=path)
    dense = torch.nn.functional.scaled_dot_product_attention(q[1:].double(), k[1:, :, 44:].double(),
                                                             v[1:, :, 44:].double(), enable_gqa=True)
    assert rel_err(out[1:], dense) < 1e-5


@pytest.mark.parametrize("path", ["cpu", "triton"])
def test_narrowed_cache_view_with_nan_guard(path):
    """k/v are narrow()ed views of a NaN-filled bigger buffer: no read beyond T, strides honoured."""
    q, k, v, labels, channels = make_inputs(1000, 3, 64)
    big_k = torch.full((1, KVH, 1200, 64), float("nan"))
    big_v = torch.full((1, KVH, 1200, 64), float("nan"))
    big_k[:, :, :1000], big_v[:, :, :1000] = k, v
    big_l = torch.full((1, KVH, 1200, 8), float("nan"))
    big_l[:, :, :1000] = labels
    out = ds_decode_attention(q, big_k.narrow(2, 0, 1000), big_v.narrow(2, 0, 1000), big_l.narrow(2, 0, 1000),
                              channels, 125, SINK, RECENT, path=path)
    ref = ds_decode_attention(q, k, v, labels, channels, 125, SINK, RECENT, path="reference")
    assert torch.isfinite(out).all()
    assert rel_err(out, ref.double()) < 1e-5


def test_sink_recent_priority_when_budget_small():
    """budget < sink + recent: sink first, then the most recent tokens; all paths agree."""
    q, k, v, labels, channels = make_inputs(200, 2, 64)
    idxs = [ds_decode_attention(q, k, v, labels, channels, 10, sink=4, recent=64, path=p, return_indices=True)[1]
            for p in ("reference", "cpu", "triton")]
    want = set(range(4)) | set(range(194, 200))
    for idx in idxs:
        assert set(idx[0, 0].tolist()) == want and set(idx[0, 1].tolist()) == want


def test_dense_reference_matches_sdpa():
    q, k, v, _, _ = make_inputs(1000, 4, 64)
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    assert rel_err(dense_decode_reference(q, k, v), dense) < 1e-6
    assert rel_err(ds_cpu.dense_decode_cpu(q, k, v), dense) < 1e-5


@pytest.mark.parametrize("bad, match", [
    (dict(budget=0), "budget must be > 0"),
    (dict(budget=-3), "budget must be > 0"),
    (dict(channels=torch.zeros(2, 65, dtype=torch.long)), r"r = 65 heavy channels"),
    (dict(channels=torch.zeros(3, 8, dtype=torch.long)), "channels has 3 rows"),
    (dict(channels=torch.full((2, 8), 64)), r"channel indices must lie in \[0, 64\)"),
    (dict(q=torch.randn(1, 5, 1, 64)), "not a multiple"),
    (dict(q=torch.randn(1, 6, 2, 64)), "one query token"),
    (dict(v=torch.randn(1, 2, 99, 64)), "differ"),
    (dict(labels=torch.randn(1, 2, 63, 4)), "labels shape"),
    (dict(group_reduce="mean"), "group_reduce"),
    (dict(key_mask=torch.ones(1, 62, dtype=torch.bool)), "key_mask shape"),
    (dict(path="gpu"), "path must be one of"),
], ids=["budget0", "budget-neg", "r>D", "channel-rows", "channel-range", "gqa", "prefill", "kv-shape",
        "labels", "reduce", "mask", "path"])
def test_bad_input_errors(bad, match):
    q, k, v, labels, channels = make_inputs(63, 3, 64)
    kw = dict(q=q, k=k, v=v, labels=labels, channels=channels, budget=16, path="reference")
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ds_decode_attention(**kw)


def test_dispatch_env_forces_path(monkeypatch):
    calls = []
    real = ds_triton.ds_attend_triton
    monkeypatch.setattr(ds_triton, "ds_attend_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v, labels, channels = make_inputs(63, 1, 64)
    monkeypatch.setenv("ACCEL_KERNEL", "triton")
    ds_decode_attention(q, k, v, labels, channels, 16)
    assert calls == [1]
    monkeypatch.setenv("ACCEL_KERNEL", "cpu")
    ds_decode_attention(q, k, v, labels, channels, 16)
    assert calls == [1]


def _launches_outside_device_guard(path):
    """Triton launches (`kernel[grid](...)`) in `path` that are not inside `with device_guard(...)`."""
    import ast

    tree = ast.parse(path.read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", getattr(
                    i.context_expr.func, "attr", "")) == "device_guard" for i in node.items):
            guarded |= {id(n) for n in ast.walk(node)}
    return [f"{path.name}:{n.lineno}" for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript) and id(n) not in guarded]


def test_every_triton_launch_runs_on_its_tensors_device():
    """A layer on cuda:1 must launch on cuda:1 (flash-attention's rule): each launch in every
    accel/kernels/*/triton_kernel.py sits in `with device_guard(x):`."""
    import pathlib

    files = sorted((pathlib.Path(__file__).resolve().parents[1] / "accel" / "kernels").glob("*/triton_kernel.py"))
    assert len(files) >= 3
    launches = [p for p in files if "[" in p.read_text()]
    assert launches
    bad = [x for p in files for x in _launches_outside_device_guard(p)]
    assert not bad, f"Triton launches outside device_guard: {bad}"


def test_device_guard_is_a_cuda_device_for_cuda_tensors_only():
    from types import SimpleNamespace

    from accel.kernels.dispatch import device_guard

    g = device_guard(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    with device_guard(torch.zeros(1)):  # CPU (the Triton interpreter): a no-op
        pass


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_causal_attention_matches_its_reference_with_padding(reduce):
    """Evaluation mode (chunked row selection + masked SDPA) against its spec (a decode step per
    row), batch 2 with left padding on one row, T = 63, GQA 3, budget below and above a row's keys."""
    from accel.kernels.ds_attention import ds_causal_attention, ds_causal_attention_reference, gather_labels

    g = torch.Generator().manual_seed(42)
    B, T, D = 2, 63, 16
    q = torch.randn(B, KVH * 3, T, D, generator=g)
    k, v = torch.randn(B, KVH, T, D, generator=g), torch.randn(B, KVH, T, D, generator=g)
    ch = torch.stack([torch.randperm(D, generator=g)[:3] for _ in range(KVH)])
    lab = gather_labels(k, ch)
    pad = 5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal.expand(B, T, T).clone()
    allowed[1, :, :pad] = False
    for budget in (9, 80):
        out = ds_causal_attention(q, k, v, lab, ch, budget, 2, 3, None, reduce, allowed, max_elems=B * 6 * T * 5)
        ref = ds_causal_attention_reference(q.double(), k.double(), v.double(), lab.double(), ch, budget, 2, 3,
                                            None, reduce, allowed)
        rows = allowed.any(-1)  # padded query rows are unspecified
        assert torch.isfinite(out).all()
        for b in range(B):
            got, want = out[b][:, rows[b]], ref[b][:, rows[b]]
            assert_within(rel_err(got, want), 0.0, torch.float32, T, what=f"budget {budget} batch {b}")
