"""The native bf16 linear `accel::dense_linear` (accel/kernels/dense_linear/) against the reference."""
import pytest
import torch
import torch.nn.functional as F

from accel.kernels import dense_linear as dl
from accel.kernels.dense_linear import cpp_ext
from kernel_tolerances import assert_within, rel_err

pytestmark = pytest.mark.skipif(not cpp_ext.available(), reason="needs a C++ compiler and AVX512-BF16")

# (out, in): odd row counts (tails of the 8- and 4-row blocks), K % 32 != 0 (masked tail), K < 32,
# SmolLM2's shapes.
SHAPES = [(63, 1000), (1000, 63), (7, 17), (576, 576), (192, 576), (1536, 576), (576, 1536), (33, 4096)]


@pytest.mark.parametrize("out,inp", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8], ids=lambda r: f"M{r}")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"t{t}")
def test_kernel_matches_reference(out, inp, rows, bias, threads):
    g = torch.Generator().manual_seed(42)
    w = torch.randn(out, inp, generator=g).bfloat16()
    x = torch.randn(rows, inp, generator=g).bfloat16()
    b = torch.randn(out, generator=g).bfloat16() if bias else None
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert dl.usable(x, w, b)
        y = torch.ops.accel.dense_linear(x, w, b)
    finally:
        torch.set_num_threads(n)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    ref = dl.dense_linear_reference(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert_within(rel_err(y, exact), rel_err(ref, exact), torch.bfloat16, inp, what=f"{out}x{inp} M={rows}")
    # Not just close in norm: no element off by more than a few bf16 ulps of its magnitude.
    assert ((y.double() - exact).abs() <= 4 * 2 ** -8 * exact.abs() + 1e-2).all()


def test_leading_dims_and_fallbacks():
    """[..., in] inputs keep their leading dims; everything the kernel does not take (fp32, more
    than MAX_ROWS rows, autograd) is F.linear exactly."""
    g = torch.Generator().manual_seed(42)
    w = torch.randn(63, 1000, generator=g).bfloat16()
    x = torch.randn(1, 1, 1000, generator=g).bfloat16()
    y = dl.dense_linear(x, w)
    assert y.shape == (1, 1, 63)
    assert_within(rel_err(y, F.linear(x.double(), w.double())), rel_err(F.linear(x, w), F.linear(x.double(), w.double())),
                  torch.bfloat16, 1000)
    many = torch.randn(2, dl.MAX_ROWS, 1000, generator=g).bfloat16()
    assert not dl.usable(many, w)
    assert torch.equal(dl.dense_linear(many, w), F.linear(many, w))
    # The C++ op itself falls back to at::linear too (it is correct for any input).
    assert torch.equal(torch.ops.accel.dense_linear(many, w, None), F.linear(many, w))
    x32, w32 = x.float(), w.float()
    assert not dl.usable(x32, w32)
    assert torch.equal(torch.ops.accel.dense_linear(x32, w32, None), F.linear(x32, w32))
    wg = w.clone().requires_grad_()
    assert not dl.usable(x, wg)
    with torch.no_grad():
        assert dl.usable(x, wg)


def test_bad_shapes_raise():
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.accel.dense_linear(torch.zeros(1, 15, dtype=torch.bfloat16), w, None)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.accel.dense_linear(torch.zeros(1, 16, dtype=torch.bfloat16), w, torch.zeros(7, dtype=torch.bfloat16))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_opcheck(bias):
    """Schema (defined in C++), the Python fake implementation and the CPU kernel agree."""
    g = torch.Generator().manual_seed(42)
    w = torch.randn(63, 1000, generator=g).bfloat16()
    b = torch.randn(63, generator=g).bfloat16() if bias else None
    for x in (torch.randn(1, 1000, generator=g).bfloat16(), torch.randn(3, 1, 1000, generator=g).bfloat16()):
        torch.library.opcheck(torch.ops.accel.dense_linear, (x, w, b),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_not_ready_means_f_linear(monkeypatch):
    """A FastLinear in a process that never built the kernel (an unpickled model) must not call an
    op that is not registered yet: until available() has succeeded, F.linear runs."""
    monkeypatch.setattr(cpp_ext, "READY", False)
    g = torch.Generator().manual_seed(42)
    x, w = torch.randn(1, 1000, generator=g).bfloat16(), torch.randn(63, 1000, generator=g).bfloat16()
    assert not dl.usable(x, w)
    assert torch.equal(dl.dense_linear(x, w), F.linear(x, w))
