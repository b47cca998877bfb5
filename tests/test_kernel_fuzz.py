"""Seeded kernel fuzz: every CPU path (torch and native C++) and the Triton kernels (under
TRITON_INTERPRET=1) against their reference on random shapes, dtypes and parameters.

Each case is drawn from its own seed (the id names the seed and what it drew; rerun one with
`-k <id>`). Tolerances, per path (`kernel_tolerances.py`: ratio bounds have an ulps x sqrt(n) floor):
- DS selection, every path: the spec's selection (fp32 scores), except swaps between valid tokens
  whose fp64 scores tie with the k-th selected score within 1e-5 relative; forced tokens always in.
- DS attention, every path: rel. error vs fp64 over the same tokens <= 2x plain torch's error in
  the input dtype (floored; n = max(D, selected tokens)).
- GQSA: cpu-dequant, the exact routes and Triton: <= 2x torch's F.linear error on the dequantized
  weight (floored; n = in_features). cpu-avx512 with fp32/fp16 activations below 64 rows (bf16
  hi + lo parts, documented): rel. error < 1e-4 (or the floored ratio bound, for fp16 outputs). cpu-int4-* with bf16 activations (bf16 scales,
  documented): SQNR > 35 dB against the exact product.
- R-Sparse, every path: <= 2x torch's error of the reference in the input dtype (floored;
  n = in_features + rank).
Triton runs fp32/fp16 only (bf16 is wrong under the interpreter) and small shapes (it is slow).
"""
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from accel.kernels.ds_attention import cpu as ds_cpu
from accel.kernels.ds_attention import ds_attend_reference, ds_select_reference, forced_budget, label_scores_reference
from accel.kernels.ds_attention.reference import valid_rank
from accel.kernels.gqsa_linear import cpp_ext as gqsa_cpp
from accel.kernels.gqsa_linear.cpu import CPUGQSA
from accel.kernels.gqsa_linear.format import pack_weight
from accel.kernels.rsparse_linear import cpp_ext as rs_cpp
from accel.kernels.rsparse_linear import cpu as rs_cpu
from accel.kernels.rsparse_linear import rsparse_linear_ref
from kernel_tolerances import assert_within, ratio_bound, rel_err, sqnr_db

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Draw:
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def int(self, lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=self.g))

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]


def cases(prefix, paths, n, seed0, draw_fn):
    """n pytest params per path; each draws its parameters from its own seed."""
    out = []
    for path in paths:
        for i in range(n):
            seed = seed0 + i
            p = draw_fn(Draw(seed), path)
            tag = "-".join(f"{k}{v}" for k, v in p.items() if k != "dtype")
            out.append(pytest.param(path, seed, p, id=f"{prefix}-{path}-s{seed}-{p['dtype']}-{tag}"))
    return out


# ---- Double Sparsity ----------------------------------------------------------------------------
def draw_ds(d: Draw, path):
    small = path.startswith("triton")
    T = d.int(5, 200 if small else 700)
    p = dict(T=T, G=d.int(1, 4), KVH=d.int(1, 2), D=d.pick((16, 32, 48, 64) if small else (16, 32, 48, 64, 80, 128)),
             B=d.int(1, 2), budget=d.int(1, T + 4), sink=d.int(0, 4), recent=d.int(0, 16),
             reduce=d.pick(("max", "sum")), pad=d.pick((0, 0, d.int(1, T - 1) if T > 1 else 0)),
             dtype=d.pick(("fp32", "fp16") if small else ("fp32", "fp32", "fp16", "bf16")))
    p["r"] = d.int(1, min(p["D"], 16))
    return p


def ds_inputs(seed, p):
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[p["dtype"]]
    B, KVH, T, D, r = p["B"], p["KVH"], p["T"], p["D"], p["r"]
    q = torch.randn(B, KVH * p["G"], 1, D, generator=g).to(dt)
    k = torch.randn(B, KVH, T, D, generator=g).to(dt)
    v = torch.randn(B, KVH, T, D, generator=g).to(dt)
    channels = torch.stack([torch.randperm(D, generator=g)[:r] for _ in range(KVH)])
    labels = torch.gather(k, 3, channels[None, :, None, :].expand(B, KVH, T, r)).contiguous()
    key_mask = None
    if p["pad"]:
        key_mask = torch.ones(B, T, dtype=torch.bool)
        key_mask[-1, :p["pad"]] = False  # the last row left-padded
    return q, k, v, labels, channels, key_mask


def _ds_select(path):
    if path == "cpu":
        return ds_cpu.ds_select_cpu
    if path == "cpu-torch":
        def run(*a):
            with mock.patch.object(ds_cpu.cpp_ext, "load", lambda: None):
                return ds_cpu.ds_select_cpu(*a)
        return run
    from accel.kernels.ds_attention.triton_kernel import ds_select_triton
    return ds_select_triton


def _ds_attend(path):
    if path == "cpu":
        return lambda q, k, v, idx, km: ds_cpu.ds_attend_cpu(q, k, v, idx, None, ds_cpu.drop_trivial_mask(km))
    if path == "cpu-torch":
        def run(q, k, v, idx, km):
            with mock.patch.object(ds_cpu.cpp_ext, "load", lambda: None):
                return ds_cpu.ds_attend_cpu(q, k, v, idx, None, km)
        return run
    from accel.kernels.ds_attention.triton_kernel import ds_attend_triton
    return lambda q, k, v, idx, km: ds_attend_triton(q, k, v, idx, None, km)


@pytest.mark.parametrize("path,seed,p", cases("ds-select", ("cpu", "cpu-torch"), 35, 1000, draw_ds)
                         + cases("ds-select", ("triton",), 12, 1100, draw_ds))
def test_ds_select(path, seed, p):
    q, k, v, labels, channels, km = ds_inputs(seed, p)
    args = (p["budget"], p["sink"], p["recent"], p["reduce"], km)
    got = _ds_select(path)(q, labels, channels, *args)
    ref = ds_select_reference(q.double(), labels.double(), channels, *args)
    assert got.shape == ref.shape
    s = label_scores_reference(q.double(), labels.double(), channels, p["reduce"])
    rank, n_valid = valid_rank(km, p["B"], p["T"], q.device)
    sink_e, recent_e = forced_budget(p["budget"], p["sink"], p["recent"])
    for b in range(p["B"]):
        valid = {t for t in range(p["T"]) if rank[b, t] >= 0}
        forced = {t for t in valid if rank[b, t] < sink_e or rank[b, t] >= n_valid[b] - recent_e}
        for h in range(p["KVH"]):
            have, want = set(got[b, h].tolist()) & valid, set(ref[b, h].tolist()) & valid
            assert len(set(got[b, h].tolist())) == got.shape[-1], "duplicate indices"
            assert forced <= have and len(have) == len(want)
            free = want - forced
            kth = float(s[b, h, list(free)].min()) if free else 0.0
            for t in have ^ want:
                assert abs(float(s[b, h, t]) - kth) <= 1e-5 * max(1.0, abs(kth)), f"token {t} wrongly (de)selected"


def _yardstick_attend(q, k, v, idx, km):
    """Plain torch in the input dtype over the selected tokens (the error yardstick)."""
    B, H, _, D = q.shape
    KVH = k.shape[1]
    gi = idx[..., None].expand(*idx.shape, D)
    ks, vs = torch.gather(k, 2, gi), torch.gather(v, 2, gi)
    logits = torch.matmul(q[:, :, 0].reshape(B, KVH, -1, D), ks.transpose(-1, -2)) * D ** -0.5
    if km is not None:
        ok = torch.gather(km[:, None, :].expand(B, KVH, -1), 2, idx)
        logits = logits.masked_fill(~ok[:, :, None, :], float("-inf"))
    p = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return torch.matmul(p, vs).reshape(B, H, 1, D)


@pytest.mark.parametrize("path,seed,p", cases("ds-attend", ("cpu", "cpu-torch"), 35, 2000, draw_ds)
                         + cases("ds-attend", ("triton",), 16, 2100, draw_ds))
def test_ds_attend(path, seed, p):
    q, k, v, labels, channels, km = ds_inputs(seed, p)
    idx = ds_select_reference(q, labels, channels, p["budget"], p["sink"], p["recent"], p["reduce"], km)
    exact = ds_attend_reference(q.double(), k.double(), v.double(), idx, None, km)
    torch_err = rel_err(_yardstick_attend(q, k, v, idx, km), exact)
    out = _ds_attend(path)(q, k, v, idx, km)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_within(rel_err(out, exact), torch_err, q.dtype, max(p["D"], idx.shape[-1]), what=path)


# ---- GQSA ---------------------------------------------------------------------------------------
def draw_gqsa(d: Draw, path):
    if path == "native":
        g, bits = d.pick((16, 32, 64)), 4
    elif path == "torch":
        g, bits = d.pick((8, 16, 24, 32, 64)), d.pick((2, 3, 4, 4, 8))
    else:
        g, bits = d.pick((8, 16, 24, 32)), d.pick((2, 3, 4, 8))
    tile = d.pick((1, 16, 32)) if path != "triton" else d.pick((1, 32))
    out = d.pick((16, 32, 48, 64)) if tile > 1 or d.int(0, 1) else d.int(1, 70)
    rows = d.pick((1, 2, 3, 5, 8, 13, 64, 70)) if path != "triton" else d.pick((1, 3, 8, 11, 20))
    return dict(out=out, inp=g * d.int(1, 12 if path == "triton" else 24), g=g, W=bits,
                S=d.pick((0.0, 0.25, 0.5, 0.75, 0.9)), tile=tile, rows=rows, bias=d.int(0, 1),
                dtype=d.pick(("fp32", "fp16")) if path == "triton" else d.pick(("fp32", "fp16", "bf16")))


def gqsa_inputs(seed, p):
    g = torch.Generator().manual_seed(seed)
    w = pack_weight(torch.randn(p["out"], p["inp"], generator=g) * 0.05, sparsity=p["S"], group_size=p["g"],
                    bits=p["W"], tile_rows=p["tile"])
    x = torch.randn(p["rows"], p["inp"], generator=g).to(DTYPES[p["dtype"]])
    bias = torch.randn(p["out"], generator=g) if p["bias"] else None
    return w, x, bias


@pytest.mark.parametrize("path,seed,p", cases("gqsa", ("native", "torch"), 50, 3000, draw_gqsa)
                         + cases("gqsa", ("triton",), 16, 3100, draw_gqsa))
def test_gqsa(path, seed, p, monkeypatch):
    if path == "native" and not gqsa_cpp.available():
        pytest.skip("the native GQSA kernel needs a C++ compiler and AVX512-BF16/VBMI")
    w, x, bias = gqsa_inputs(seed, p)
    wd = w.dequantize().double()
    exact = F.linear(x.double(), wd, None if bias is None else bias.double())
    torch_err = rel_err(F.linear(x, wd.to(x.dtype), None if bias is None else bias.to(x.dtype)), exact)
    if path == "triton":
        from accel.kernels.gqsa_linear.triton_kernel import gqsa_linear_triton
        kind = "gemm" if p["tile"] % 32 == 0 and p["out"] % 32 == 0 and p["rows"] > 8 else "gemv"
        y, name = gqsa_linear_triton(x, w, bias, force=kind), f"triton-{kind}"
    else:
        if path == "torch":
            monkeypatch.setattr(gqsa_cpp, "available", lambda: False)
        k = CPUGQSA(w)
        assert (k.path == "cpu-avx512") == (path == "native"), k.path
        y, name = k(x, bias), k.path
    assert y.dtype == x.dtype and y.shape == (p["rows"], p["out"])
    if name == "cpu-avx512" and x.dtype != torch.bfloat16 and p["rows"] < 64:
        # ~16 bits per activation (fp16 output rounding can dominate: the floored ratio bound).
        assert rel_err(y, exact) < max(1e-4, ratio_bound(torch_err, x.dtype, p["inp"])), name
    elif name.startswith("cpu-int4") and x.dtype == torch.bfloat16:
        assert sqnr_db(exact, y) > 35, name
    else:
        assert_within(rel_err(y, exact), torch_err, x.dtype, p["inp"], what=name)


# ---- R-Sparse -----------------------------------------------------------------------------------
def draw_rs(d: Draw, path):
    small = path == "triton"
    out, inp = d.int(1, 130 if small else 300), d.int(1, 130 if small else 300)
    tokens = {"cpp": 1, "dense": d.pick((9, 20, 33))}.get(path, d.pick((1, 2, 3, 5, 8)))
    dtypes = {"cpp": ("fp32",), "sparse_mm": ("fp32",), "triton": ("fp32", "fp16")}.get(path, ("fp32", "fp16", "bf16"))
    return dict(out=out, inp=inp, r=d.int(0, min(out, inp, 20)), tok=tokens, q=d.pick((0.0, 0.3, 0.5, 0.8, 1.0)),
                bias=d.int(0, 1), dtype=d.pick(dtypes))


def rs_inputs(seed, p):
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[p["dtype"]]
    w = torch.randn(p["out"], p["inp"], generator=g) / math.sqrt(p["inp"])
    x = torch.randn(p["tok"], p["inp"], generator=g)
    down = torch.randn(p["r"], p["inp"], generator=g) / math.sqrt(p["inp"]) if p["r"] else None
    up = torch.randn(p["out"], p["r"], generator=g) if p["r"] else None
    bias = torch.randn(p["out"], generator=g) if p["bias"] else None
    scale = w.norm(dim=0) + 1e-3
    thr = float((x.abs() * scale).flatten().quantile(p["q"]))
    c = lambda t: None if t is None else t.to(dt)  # noqa: E731
    return c(x), c(w), scale, thr, c(down), c(up), c(bias)


@pytest.mark.parametrize("path,seed,p", cases("rsparse", ("cpp", "embedding_bag", "sparse_mm", "dense"), 15, 4000, draw_rs)
                         + cases("rsparse", ("triton",), 14, 4100, draw_rs))
def test_rsparse(path, seed, p, monkeypatch):
    x, w, scale, thr, down, up, bias = rs_inputs(seed, p)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    exact = rsparse_linear_ref(x.double(), w.double(), scale.double(), thr, d(down), d(up), d(bias))
    torch_err = rel_err(rsparse_linear_ref(x, w, scale, thr, down, up, bias), exact)
    wt = w.t().contiguous()
    if path == "triton":
        from accel.kernels.rsparse_linear.triton_kernel import rsparse_linear_triton
        y = rsparse_linear_triton(x, wt, scale, thr, down, up, bias, block_n=32, block_k=32, block_r=16)
    else:
        if path == "cpp" and not rs_cpp.available():
            pytest.skip("the R-Sparse C++ kernel did not build here")
        if path != "cpp":
            monkeypatch.setattr(rs_cpp, "available", lambda: False)
        if path == "sparse_mm":
            monkeypatch.setattr(rs_cpu, "COO_MIN_NUMEL", 0)
        y = rs_cpu.rsparse_linear_cpu(x, w, scale, thr, down, up, bias, weight_t=None if path == "dense" else wt)
    assert y.dtype == x.dtype and y.shape == (p["tok"], p["out"])
    assert_within(rel_err(y, exact), torch_err, x.dtype, p["inp"] + p["r"], what=path)
