"""The conftest fills new torch.empty tensors with NaN (ints with a sentinel): a kernel that
leaves part of its output unwritten must show up as NaN, not as the allocator's leftover zeros."""
import pytest
import torch

from conftest import INT_SENTINEL, NAN_EMPTY

pytestmark = pytest.mark.skipif(not NAN_EMPTY, reason="ACCEL_TEST_NAN_EMPTY=0")


def test_new_empty_tensors_are_poisoned():
    assert torch.empty(3, 5).isnan().all()
    assert torch.empty_like(torch.zeros(4, dtype=torch.bfloat16)).isnan().all()
    assert torch.empty_strided((2, 3), (1, 2), dtype=torch.float16).isnan().all()
    assert torch.ones(2).new_empty((7,)).isnan().all()
    assert (torch.empty(6, dtype=torch.long) == INT_SENTINEL).all()
    assert (torch.empty(6, dtype=torch.int8) == 127).all()
    leaf = torch.empty(3, requires_grad=True)
    assert leaf.is_leaf and leaf.requires_grad and leaf.isnan().all()
    out = torch.zeros(3)
    torch.empty(3, out=out)
    assert out.isnan().all()


def test_a_kernel_that_skips_the_tail_is_caught():
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    x = torch.arange(10, dtype=torch.float32)
    y = torch.empty_like(x)
    _copy[(1,)](x, y, 9, BLOCK=16)  # bug: n - 1
    assert torch.equal(y[:9], x[:9]) and y[9].isnan()
