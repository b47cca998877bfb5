"""The native GQSA prefill paths (gqsa_amx.cpp): bf16 batches of AMX_ROWS rows or more run AMX tile
GEMMs on weight blocks dequantized in cache (x as the B operand below 64 rows, the A operand up to
256) or, from 256 rows, torch's GEMM on the whole dequantized weight; other batches keep the decode
passes or torch's GEMM on dequantized blocks. Every result is checked against the reference with the
shared floors (tests/kernel_tolerances.py)."""
import pytest
import torch
import torch.nn.functional as F

from accel.kernels.gqsa_linear import cpp_ext
from accel.kernels.gqsa_linear.cpu import AMX_ROWS, PREFILL_ROWS, CPUGQSA
from accel.kernels.gqsa_linear.format import pack_weight
from kernel_tolerances import assert_within, rel_err

pytestmark = [pytest.mark.skipif(not cpp_ext.available(), reason="needs a C++ compiler and AVX512-BF16/VBMI"),
              pytest.mark.usefixtures("one_thread")]

# (out, in, g): N and K multiples of 32; N tails (1000, 33, 50); K % 32 != 0 (1008, 80: no AMX tile
# fits, the fallback paths run); g = 32.
SHAPES = [(1000, 576, 16), (33, 160, 32), (50, 96, 16), (64, 1536, 16), (63, 1008, 16), (40, 80, 16)]


def _weight(out, inp, g, seed=42):
    gen = torch.Generator().manual_seed(seed)
    return pack_weight(torch.randn(out, inp, generator=gen) * 0.05, sparsity=0.5, group_size=g), gen


def _check(w, x):
    wd = w.dequantize().double()
    exact = F.linear(x.double(), wd)
    y = cpp_ext.linear(x, w.qweight, w.colmask, w.scales, w.zeros, w.group_size)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.out_features)
    assert_within(rel_err(y, exact), rel_err(F.linear(x, wd.to(x.dtype)), exact), x.dtype, w.in_features,
                  what=f"{tuple(x.shape)} x {w.out_features}")
    return y


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rows", [1, 7, 8, 33, 63, 64, 65, 1000], ids=lambda r: f"M{r}")
def test_bf16_batches_match_reference(shape, rows):
    w, gen = _weight(*shape)
    if rows == 1000 and shape[0] * shape[1] > 600_000:
        rows = 200  # keep the fp64 reference fast; 1000 rows run on the smaller shapes
    _check(w, torch.randn(rows, shape[1], generator=gen).bfloat16())


def test_constants_agree_with_the_cpp_source():
    assert cpp_ext.amx_rows() == AMX_ROWS and cpp_ext.prefill_rows() == PREFILL_ROWS
    assert 1 < AMX_ROWS <= PREFILL_ROWS


def test_the_amx_path_runs_where_amx_is_usable():
    """Which path runs is not visible in the result; this pins that the kernel is the AMX one here
    (a silent fallback would keep the tests green and the prefill slow)."""
    import re
    from pathlib import Path

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if not re.search(r"\bamx_bf16\b", flags):
        pytest.skip("CPU without AMX-BF16")
    assert cpp_ext.amx_available()


@pytest.mark.parametrize("rows", [9, 40, 100, 300], ids=lambda r: f"M{r}")
def test_rows_split_over_threads_give_identical_results(rows):
    w, gen = _weight(1000, 576, 16)
    x = torch.randn(rows, 576, generator=gen).bfloat16()
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(cpp_ext.linear(x, w.qweight, w.colmask, w.scales, w.zeros, 16))
    torch.set_num_threads(1)
    # Each output element is summed by one thread, in one order: the split changes no bit.
    assert torch.equal(outs[0], outs[1])


def test_repeated_calls_of_other_sizes_do_not_leak_scratch_between_calls():
    """Scratch is reused per thread: a large call then a small one (and back) gives the small
    call's own result, bit for bit."""
    w, gen = _weight(96, 576, 16)
    small = torch.randn(33, 576, generator=gen).bfloat16()
    first = cpp_ext.linear(small, w.qweight, w.colmask, w.scales, w.zeros, 16)
    cpp_ext.linear(torch.randn(300, 576, generator=gen).bfloat16(), w.qweight, w.colmask, w.scales, w.zeros, 16)
    assert torch.equal(cpp_ext.linear(small, w.qweight, w.colmask, w.scales, w.zeros, 16), first)


@pytest.mark.parametrize("rows", [33, 100], ids=lambda r: f"M{r}")
def test_corrupt_bitmap_is_refused_on_the_prefill_path(rows):
    w, gen = _weight(40, 576, 16)
    bad = w.colmask.clone()
    bad[37, 0] |= 0xFF  # row 37 now keeps more groups than the others
    with pytest.raises(RuntimeError, match="column bitmap of row 37"):
        cpp_ext.linear(torch.randn(rows, 576, generator=gen).bfloat16(), w.qweight, bad, w.scales, w.zeros, 16)


def test_fp32_batches_keep_the_exact_path():
    w, gen = _weight(50, 96, 16)
    x = torch.randn(100, 96, generator=gen)
    y = CPUGQSA(w)(x)
    assert rel_err(y, F.linear(x.double(), w.dequantize().double())) < 1e-5


@pytest.mark.slow
def test_smollm2_prefill_linears_match_reference(monkeypatch):
    """SmolLM2 bf16 with g16 W4S50 (RTN) weights, prompts of 40, 100 and 300 tokens (the three AMX
    paths): every GQSA linear, on the activations it really sees, within the bound of torch's bf16
    F.linear on the dequantized weight (floored)."""
    import accel
    from accel.calibrate.gqsa import rtn_artifact
    from accel.configs.gqsa import GQSAConfig
    from kernel_tolerances import ratio_bound

    model, _ = accel.models.load("smollm2-135m", dtype="bfloat16")
    art = rtn_artifact(model, GQSAConfig(bits=4, sparsity=0.5, group_size=16))
    ratios = []

    def check(mod, inp, out):
        x = inp[0].reshape(-1, inp[0].shape[-1])
        wd = mod.packed().dequantize().double()
        exact = F.linear(x.double(), wd)
        torch_err = rel_err(F.linear(x, wd.to(x.dtype)), exact)
        ratios.append(rel_err(out.reshape(exact.shape), exact) / ratio_bound(torch_err, x.dtype, x.shape[-1]))

    monkeypatch.setenv("ACCEL_KERNEL", "cpu")
    gen = torch.Generator().manual_seed(42)
    with accel.patched(model, art):
        hooks = [m.register_forward_hook(check) for m in model.modules() if type(m).__name__ == "GQSALinear"]
        with torch.inference_mode():
            for n in (40, 100, 300):
                model(input_ids=torch.randint(1, model.config.vocab_size, (1, n), generator=gen))
        for h in hooks:
            h.remove()
    assert len(ratios) == 3 * 30 * 7
    assert max(ratios) <= 1, max(ratios)
