"""Shared fixtures. TRITON_INTERPRET must be set before anything imports triton."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# ---- uninitialised memory is NaN (flash-linear-attention's trick) ---------------------------
# A kernel that reads an output element it never wrote, or a launcher that allocates with
# torch.empty and forgets a tail, returns whatever the allocator held: often zeros, so tests pass.
# Filling every new torch.empty / empty_like / empty_strided / Tensor.new_empty float tensor with
# NaN turns such reads into NaN outputs that the comparisons catch. Integer tensors get a large
# sentinel (an index read from unwritten memory goes out of range and raises); bool is left as is.
# Installed at import, before accel is imported, so module-level allocations are covered too.
# Subprocesses started by tests do not inherit it. ACCEL_TEST_NAN_EMPTY=0 turns it off.
_ORIG = {"empty": torch.empty, "empty_like": torch.empty_like, "empty_strided": torch.empty_strided,
         "new_empty": torch.Tensor.new_empty}
INT_SENTINEL = 2**30 + 7  # fits every signed int dtype >= int32; int8/16/uint8 take their max


def poison_(t):
    """Fill a freshly allocated strided tensor with NaN (floats) or a large sentinel (ints)."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_meta or t.numel() == 0:
        return t
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(min(INT_SENTINEL, torch.iinfo(t.dtype).max))
    return t


def _wrap(name):
    orig = _ORIG[name]

    def nan_alloc(*args, **kwargs):
        return poison_(orig(*args, **kwargs))

    nan_alloc.__name__ = nan_alloc.__qualname__ = name
    nan_alloc.__doc__ = orig.__doc__
    nan_alloc.__wrapped_original__ = orig
    return nan_alloc


NAN_EMPTY = os.environ.get("ACCEL_TEST_NAN_EMPTY", "1") != "0"
if NAN_EMPTY:
    torch.empty = _wrap("empty")
    torch.empty_like = _wrap("empty_like")
    torch.empty_strided = _wrap("empty_strided")
    torch.Tensor.new_empty = _wrap("new_empty")

import accel  # noqa: E402

TINY_ARCHS = accel.models.TINY_ARCHS


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2 in fp32, loaded once per session.

    Tests must leave it unpatched (use `accel.patched(...)` or unpatch in a finally)."""
    model, tok = accel.models.load("smollm2-135m")
    return model, tok


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request):
    return accel.models.tiny(request.param)


@pytest.fixture
def one_thread():
    """Many tiny ops: on a shared 2-vCPU VM the OpenMP spin-wait makes 2 threads far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def seed42():
    torch.manual_seed(42)
    return 42
