"""The C++ op `accel::gqsa_mm_cpu` (issue 19): defined by the native GQSA extension
(gqsa_op.cpp), fake implementation registered by cpp_ext.py; compiled graphs call it instead of
the Python custom op `accel::gqsa_linear` (no Python body per linear at decode)."""
import pytest
import torch
import torch.nn.functional as F

from accel.kernels.gqsa_linear import cpp_ext
from accel.kernels.gqsa_linear.cpu import PREFILL_ROWS, CPUGQSA
from accel.kernels.gqsa_linear.format import pack_weight
from kernel_tolerances import assert_within, rel_err

pytestmark = [pytest.mark.skipif(not cpp_ext.available(), reason="needs a C++ compiler and AVX512-BF16/VBMI"),
              pytest.mark.usefixtures("one_thread")]


def _w(out=63, inp=1008, g=16, seed=42):
    gen = torch.Generator().manual_seed(seed)
    return pack_weight(torch.randn(out, inp, generator=gen) * 0.05, sparsity=0.5, group_size=g), gen


def _op(x, w):
    return torch.ops.accel.gqsa_mm_cpu(x, w.qweight, w.colmask, w.scales, w.zeros, w.group_size)


@pytest.mark.parametrize("rows", [1, 3, PREFILL_ROWS + 1], ids=lambda r: f"M{r}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_opcheck(rows, dtype):
    """Schema, fake implementation and AOT dispatch agree with the C++ kernel (GEMV and prefill)."""
    w, gen = _w(33, 64)
    x = torch.randn(rows, 64, generator=gen).to(dtype)
    torch.library.opcheck(torch.ops.accel.gqsa_mm_cpu, (x, w.qweight, w.colmask, w.scales, w.zeros, 16),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_prefill_rows_constant_agrees_with_the_cpp_source():
    assert cpp_ext.prefill_rows() == PREFILL_ROWS


@pytest.mark.parametrize("rows", [1, 5, 13, PREFILL_ROWS, 200], ids=lambda r: f"M{r}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_op_matches_reference(rows, dtype):
    w, gen = _w(1000, 576)
    x = torch.randn(rows, 576, generator=gen).to(dtype)
    wd = w.dequantize().double()
    exact = F.linear(x.double(), wd)
    y = _op(x, w)
    assert y.dtype == dtype and y.shape == (rows, 1000)
    if dtype == torch.float32:
        # fp32 activations: bf16 hi + lo below PREFILL_ROWS (~16 bits), exact fp32 from there.
        assert rel_err(y, exact) < 1e-4
    else:
        assert_within(rel_err(y, exact), rel_err(F.linear(x, wd.to(dtype)), exact), dtype, 576)
    # The op is the function eager calls (cpp_ext.linear): same bits.
    assert torch.equal(y, cpp_ext.linear(x, w.qweight, w.colmask, w.scales, w.zeros, 16))


def test_bad_input_is_refused_with_the_op_name():
    w, _ = _w(33, 64)
    with pytest.raises(RuntimeError, match="gqsa_mm_cpu: x must be 2-D"):
        _op(torch.randn(1, 1, 64), w)


def test_compiled_linear_calls_the_cpp_op_without_graph_break():
    """Before: the graph called the Python custom op accel::gqsa_linear (~18 us of Python a call)."""
    w, gen = _w(96, 256)
    k = CPUGQSA(w)
    bias = torch.randn(96, generator=gen)
    x = torch.randn(1, 256, generator=gen).bfloat16()
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    ex = torch._dynamo.explain(lambda t: k(t, bias))(x)
    assert ex.graph_break_count == 0 and ex.graph_count == 1
    torch._dynamo.reset()
    y = torch.compile(lambda t: k(t, bias), backend=backend, fullgraph=True)(x)
    assert any("gqsa_mm_cpu" in t for t in targets), targets
    assert not any("gqsa_linear" in t for t in targets), targets
    assert torch.equal(y, k(x, bias))
