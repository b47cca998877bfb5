"""The native bf16 R-Sparse prefill (issue 16: prefill was 0.88x dense): the split pass (the mask as
a 16-bit compare of the bf16 bits, down·x_rest on AMX tiles or vdpbf16ps) and the GEMM (oneDNN's
prepacked weight, or at::mm over the padded stacked [Wᵀ; U_rᵀ; 0]) against the fp64 spec on odd
shapes and token counts; the mask's boundary exactly as the reference draws it; the patched module
on every token count through its own paths."""
import pytest
import torch
from torch import nn

from accel.kernels.rsparse_linear import cpp_ext, rsparse_linear_ref
from accel.kernels.rsparse_linear.reference import channel_mask, channel_thresholds
from kernel_tolerances import assert_within, rel_err


@pytest.fixture(scope="module", autouse=True)
def native():
    import shutil

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: R-Sparse prefill keeps its torch paths")
    assert cpp_ext.available(), "a C++ compiler is present but the R-Sparse kernel did not build"
    if not cpp_ext.bf16_available():
        pytest.skip("this CPU has no AVX512-BF16: bf16 prefill keeps the masked dense path")


def _case(out_f, in_f, r, tokens, seed=42):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64).bfloat16()
    x = torch.randn(tokens, in_f, generator=g, dtype=torch.float64).bfloat16()
    # Low-rank factors as large as the sparse term, so a wrong low-rank value cannot hide in rounding.
    down = torch.randn(r, in_f, generator=g, dtype=torch.float64).bfloat16()
    up = torch.randn(out_f, r, generator=g, dtype=torch.float64).bfloat16()
    bias = torch.randn(out_f, generator=g, dtype=torch.float64).bfloat16()
    scale = w.float().norm(dim=0)
    thr = float((x.float().abs() * scale).quantile(0.5))
    return x, w, scale, down, up, bias, thr


def _stacked(w, up, r, pad=True):
    n_in = w.shape[1]
    ld = -(-(n_in + r) // 32) * 32 if pad else n_in + r
    st = torch.zeros(ld, w.shape[0], dtype=torch.bfloat16)
    st[:n_in] = w.t()
    if r:
        st[n_in:n_in + r] = up.t()
    return st


def _spec(x, w, scale, thr, down, up, bias, r):
    lr = (down.double(), up.double()) if r else (None, None)
    ref = rsparse_linear_ref(x.double(), w.double(), scale.double(), thr, *lr, None if bias is None else bias.double())
    torch_err = rel_err(rsparse_linear_ref(x, w, scale, thr, *((down, up) if r else (None, None)), bias), ref)
    return ref, torch_err


# (out, in, r): in not a multiple of 32 (tails), r = 0, r > 16 (two AMX column tiles), in = 1.
SHAPES = [(1000, 63, 5), (63, 1000, 0), (33, 40, 3), (577, 577, 20), (64, 576, 7), (7, 1, 1)]
TOKENS = [9, 33, 63, 1000]


@pytest.mark.parametrize("gemm", ["packed", "mm", "mm-unpadded"])
@pytest.mark.parametrize("amx", [True, False], ids=["amx", "dpbf16"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prefill_matches_the_spec(shape, tokens, amx, gemm):
    out_f, in_f, r = shape
    x, w, scale, down, up, bias, thr = _case(out_f, in_f, r, tokens)
    st = _stacked(w, up, r, pad=gemm != "mm-unpadded")
    packed = cpp_ext.pack_weight(st) if gemm == "packed" else None
    if gemm == "packed" and packed is None:
        pytest.skip("this torch has no oneDNN prepacked linear")
    pk = cpp_ext.pack_down(down) if r and amx else None
    got = cpp_ext.prefill_bf16(x, channel_thresholds(scale, thr), st, down if r else None, bias, pk, amx, packed)
    ref, torch_err = _spec(x, w, scale, thr, down, up, bias, r)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, out_f)
    assert_within(rel_err(got, ref), torch_err, torch.bfloat16, in_f + r, what=f"prefill {shape} T={tokens}")


def test_amx_low_rank_equals_the_dot_product_loop():
    # Both compute down·x_rest in fp32 and round once: the GEMM input (x_S | t) must agree to the
    # last bit except where the fp32 sums round differently (summation order), which is rare.
    x, w, scale, down, up, bias, thr = _case(40, 577, 20, 100)
    tv = channel_thresholds(scale, thr)
    a = cpp_ext._mod.rsparse_split_bf16(x, tv, 608, down, cpp_ext.pack_down(down), 1)
    b = cpp_ext._mod.rsparse_split_bf16(x, tv, 608, down, torch.empty(0, dtype=torch.bfloat16), 0)
    assert torch.equal(a[:, :577], b[:, :577])
    assert (a[:, 577:597] != b[:, 577:597]).float().mean() < 0.02
    ref = ((x.double() * ~channel_mask(x, scale, thr)) @ down.double().t())
    assert rel_err(a[:, 577:597], ref) < 4e-3
    assert torch.all(a[:, 597:] == 0)


def test_split_draws_the_references_boundary():
    """The 16-bit compare equals |x| > thr (fp32) at and around each threshold, for zero, negative,
    infinite and NaN thresholds, and NaN inputs go to the rest as in the reference."""
    thr = torch.tensor([0.5, 0.5, 0.5, 0.0, 0.0, -1.0, float("inf"), float("nan"), 1e-3, 3.0000001, 0.5, 2.0])
    n = thr.numel()
    xs = torch.tensor([0.5, 0.50390625, -0.50390625, 0.0, -1e-30, 0.0, 3e38, 1.0, 1e-3, 3.0, float("nan"),
                       float("inf")]).bfloat16()
    x = torch.stack([xs, -xs, xs.roll(1)])
    buf = cpp_ext._mod.rsparse_split_bf16(x, thr, 32, torch.empty(0, dtype=torch.bfloat16),
                                          torch.empty(0, dtype=torch.bfloat16), 1)
    want = x.float().abs() > thr
    got_active = buf[:, :n] != 0
    # Zero inputs are inactive-looking either way: compare the mask only where x != 0.
    nz = x != 0
    assert torch.equal(got_active[nz], want[nz]), (got_active, want)
    assert torch.equal(buf[:, :n][want].float(), x[want].float())
    assert torch.all(buf[:, n:] == 0)


def _module(out_f=63, in_f=100, r=5):
    from accel.patches.rsparse import RSparseLinear

    x, w, scale, down, up, bias, thr = _case(out_f, in_f, r, 1)
    lin = nn.Linear(in_f, out_f).bfloat16()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    return RSparseLinear(lin, thr, scale, down, up, 0.5, 0.9)


@pytest.mark.parametrize("tokens", [1, 7, 9, 33, 63, 1000])
def test_patched_module_matches_the_spec_at_every_length(tokens):
    mod = _module()
    x = torch.randn(1, tokens, 100, generator=torch.Generator().manual_seed(42)).bfloat16()
    ref, torch_err = _spec(x[0], mod.weight, mod.scale, mod.threshold, mod.down, mod.up, mod.bias, 5)
    with torch.inference_mode():
        y = mod(x)
    assert y.shape == (1, tokens, 63) and y.dtype == torch.bfloat16
    assert_within(rel_err(y[0], ref), torch_err, torch.bfloat16, 105, what=f"module T={tokens}")


def test_patched_prefill_runs_on_the_prepacked_weight(monkeypatch):
    """Before: every prefill GEMM re-laid the weight out (at::mm / F.linear), which with the split
    pass made R-Sparse prefill 0.88x dense. The module packs once and hands the packed weight in."""
    mod = _module()
    if cpp_ext.pack_weight(mod.stacked_t()) is None:
        pytest.skip("this torch has no oneDNN prepacked linear")
    seen = []
    real = cpp_ext.prefill_bf16
    monkeypatch.setattr(cpp_ext, "prefill_bf16", lambda *a, **k: seen.append(k.get("packed")) or real(*a, **k))
    x = torch.randn(2, 20, 100, generator=torch.Generator().manual_seed(42)).bfloat16()
    with torch.inference_mode():
        y1, y2 = mod(x), mod(x)
    assert len(seen) == 2 and seen[0] is not None and seen[1] is seen[0], "prefill did not reuse one packed weight"
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert mod.stacked_t().shape == (128, 63), "stacked [Wᵀ; U_rᵀ] is padded to a multiple of 32 rows"
    # A new weight tensor rebuilds the packed state instead of reusing the old one's.
    mod.weight = nn.Parameter(mod.weight.detach() * 2, requires_grad=False)
    with torch.inference_mode():
        y3 = mod(x)
    assert seen[-1] is not seen[0]
    ref, torch_err = _spec(x[0], mod.weight, mod.scale, mod.threshold, mod.down, mod.up, mod.bias, 5)
    assert_within(rel_err(y3[0], ref), torch_err, torch.bfloat16, 105, what="after a new weight")


def test_module_holds_one_copy_of_the_weight():
    """Before: the module kept the original [out, in] weight, the stacked [Wᵀ; U_rᵀ] the kernels
    read and (bf16 prefill) oneDNN's packed copy: three copies of W (+186 MB on SmolLM2). The
    weight is now a view of the stack: same values, one storage, and in-place updates reach the
    kernels instead of leaving them on stale weights."""
    mod = _module()
    w0 = mod.weight.detach().clone()
    x = torch.randn(1, 20, 100, generator=torch.Generator().manual_seed(42)).bfloat16()
    with torch.inference_mode():
        mod(x), mod(x[:, -1:])
    stack = mod.stacked_t()
    assert mod.weight.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()
    assert not torch.is_inference(mod.weight), "the weight became an inference tensor"
    torch.testing.assert_close(mod.weight, w0, rtol=0, atol=0)
    with torch.no_grad():
        mod.weight.mul_(-1)
    with torch.inference_mode():
        dec = mod(x[:, -1:])
    ref, torch_err = _spec(x[0, -1:], -w0, mod.scale, mod.threshold, mod.down, mod.up, mod.bias, 5)
    assert_within(rel_err(dec[0], ref), torch_err, torch.bfloat16, 105, what="decode after an in-place update")
