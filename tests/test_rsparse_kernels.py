"""R-Sparse linear kernels: math identities of the spec, CPU path and Triton (interpreter) vs reference."""
import pytest
import torch

from accel.kernels.rsparse_linear import rsparse_linear, rsparse_linear_ref
from accel.kernels.rsparse_linear.cpu import rsparse_linear_cpu
from kernel_tolerances import assert_within


def _case(out_f, in_f, r, tokens, dtype=torch.float32, seed=42):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, in_f, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    down = (s[:r, None] * vh[:r])
    up = u[:, :r]
    scale = w.norm(dim=0)
    bias = torch.randn(out_f, generator=g, dtype=torch.float64)
    c = lambda t: t.to(dtype)  # noqa: E731
    return c(x), c(w), scale.float(), c(down), c(up), c(bias)


def _require_cpp():
    import shutil

    from accel.kernels.rsparse_linear import cpp_ext

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine: the C++ decode kernel falls back to COO")
    assert cpp_ext.available(), "a C++ compiler is present but the R-Sparse kernel did not build"


@pytest.mark.parametrize("shape", [(1000, 63, 500), (63, 1000, 31), (257, 4099, 0), (5, 3, 5)],
                         ids=["1000x63_k500", "63x1000_k31", "257x4099_k0", "5x3_k5"])
def test_cpp_sum_rows_matches_gather(shape):
    from accel.kernels.rsparse_linear import cpp_ext

    _require_cpp()
    n_in, n_out, k = shape
    g = torch.Generator().manual_seed(42)
    wt = torch.randn(n_in, n_out, generator=g)
    idx = torch.randperm(n_in, generator=g)[:k].sort().values
    vals = torch.randn(k, generator=g)
    ref = (vals.double() @ wt.double()[idx]).float()[None]
    got = cpp_ext.sum_rows_f32(idx, vals, wt)
    assert got.shape == (1, n_out)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="out of range"):
        cpp_ext.sum_rows_f32(torch.tensor([n_in]), torch.ones(1), wt)


def test_full_rank_all_lowrank_equals_dense():
    # threshold = +inf routes every channel low-rank; at full rank U Σ Vᵀ x = W x.
    x, w, scale, down, up, bias = _case(37, 53, 37, 5, torch.float64)
    y = rsparse_linear_ref(x, w, scale.double(), float("inf"), down, up, bias)
    torch.testing.assert_close(y, x @ w.T + bias, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["reference", "cpu"])
def test_threshold_zero_equals_dense(path):
    x, w, scale, down, up, bias = _case(63, 100, 7, 3)
    wt = w.t().contiguous()
    y = rsparse_linear(x, w, scale, 0.0, down, up, bias, path=path, weight_t=wt)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-5)


def test_lowrank_term_is_used():
    # A threshold that drops half the channels: the low-rank term must reduce the error vs pure sparse.
    x, w, scale, down, up, _ = _case(64, 96, 32, 4)
    thr = float((x.abs() * scale).median())
    dense = x @ w.T
    err_sparse = (rsparse_linear_ref(x, w, scale, thr) - dense).norm()
    err_rs = (rsparse_linear_ref(x, w, scale, thr, down, up) - dense).norm()
    assert err_rs < 0.9 * err_sparse


@pytest.mark.parametrize("fp32_path", ["cpp", "embedding_bag", "sparse_mm"])
@pytest.mark.parametrize("tokens", [1, 3, 8, 63], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("r", [0, 5], ids=lambda r: f"r{r}")
def test_cpu_matches_reference(tokens, r, fp32_path, monkeypatch):
    import accel.kernels.rsparse_linear.cpu as rs_cpu
    from accel.kernels.rsparse_linear import cpp_ext

    if fp32_path == "cpp":
        _require_cpp()
    else:
        # The fallbacks when the C++ kernel cannot build; small fp32 weights take the embedding
        # bag, so force the COO path for large weights too.
        monkeypatch.setattr(cpp_ext, "available", lambda: False)
    if fp32_path == "sparse_mm":
        monkeypatch.setattr(rs_cpu, "COO_MIN_NUMEL", 0)
    x, w, scale, down, up, bias = _case(1000, 63, r, tokens)
    thr = float((x.abs() * scale).quantile(0.5))
    ref = rsparse_linear_ref(x, w, scale, thr, down if r else None, up if r else None, bias)
    got = rsparse_linear_cpu(x, w, scale, thr, down if r else None, up if r else None, bias,
                             weight_t=w.t().contiguous())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(63, 100, 0, 1), (200, 63, 9, 3), (130, 257, 33, 8)],
                         ids=["63x100_r0_B1", "200x63_r9_B3", "130x257_r33_B8"])
@pytest.mark.parametrize("k_splits", [1, 3], ids=["ks1", "ks3"])
def test_triton_matches_reference(shape, dtype, k_splits):
    pytest.importorskip("triton")
    from accel.kernels.rsparse_linear.triton_kernel import rsparse_linear_triton

    out_f, in_f, r, b = shape
    x, w, scale, down, up, bias = _case(out_f, in_f, r, b, dtype)
    thr = float((x.float().abs() * scale).quantile(0.4))
    lr = (down, up) if r else (None, None)
    ref = rsparse_linear_ref(x.float(), w.float(), scale, thr, *(t.float() if t is not None else None for t in lr),
                             bias.float())
    got = rsparse_linear_triton(x, w.t().contiguous(), scale, thr, *lr, bias, block_n=32, block_k=32, block_r=16,
                                k_splits=k_splits)
    # Error bound: 2x the same-dtype torch error (fp16 output rounding), with the shared floor
    # (relative to the output's scale; reductions over in_f + r terms).
    torch_err = (rsparse_linear_ref(x, w, scale, thr, *lr, bias).float() - ref).abs().max().item()
    scale_y = ref.abs().max().item()
    assert_within((got.float() - ref).abs().max().item() / scale_y, torch_err / scale_y, dtype, in_f + r)
    assert got.dtype == dtype


@pytest.mark.parametrize("tokens", [1, 3, 8], ids=lambda t: f"T{t}")
def test_cpu_bf16_gather_path_within_2x_torch_error(tokens):
    """bf16 decode through the int32 embedding_bag path: same error bound as the kernels."""
    x, w, scale, down, up, bias = _case(1000, 63, 5, tokens)
    thr = float((x.abs() * scale).quantile(0.5))
    ref = rsparse_linear_ref(x.double(), w.double(), scale.double(), thr, down.double(), up.double(), bias.double())
    xb, wb, db, ub, bb = (t.bfloat16() for t in (x, w, down, up, bias))
    got = rsparse_linear_cpu(xb, wb, scale, thr, db, ub, bb, weight_t=wb.t().contiguous())
    torch_err = (rsparse_linear_ref(xb, wb, scale, thr, db, ub, bb).double() - ref).norm() / ref.norm()
    assert got.dtype == torch.bfloat16
    assert_within(((got.double() - ref).norm() / ref.norm()).item(), torch_err.item(), torch.bfloat16, 63 + 5)
