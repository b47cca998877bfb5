"""The shared kernel error bound (tests/kernel_tolerances.py): why a ratio-only bound is flaky, and
that the floor keeps the bound tight enough to catch real bugs.

The yardstick "<= 2x torch's error" failed CI on another Xeon (DS attention, T63-G1-D128 fp32:
2.97e-7 against 2 x 1.01e-7). Here the same kind of failure is reproduced on this CPU with a
computation that is just as valid as torch's: q pre-scaled, online softmax over blocks of 8 tokens
(what flash-decoding kernels and our Triton kernel do)."""
import pytest
import torch

from accel.kernels.ds_attention import ds_attend_reference, ds_select_reference
from kernel_tolerances import abs_floor, ratio_bound, rel_err
from test_ds_attention_kernels import RECENT, SINK, budget_for, make_inputs, torch_same_dtype_attend


def blocked_attend(q, k, v, idx, block=8):
    """Exact attention over idx, reassociated: (q * scaling) . k, online softmax per token block."""
    B, H, _, D = q.shape
    G = H // k.shape[1]
    gi = idx[..., None].expand(*idx.shape, D)
    ks, vs = torch.gather(k, 2, gi), torch.gather(v, 2, gi)
    qg = q[:, :, 0].reshape(B, -1, G, D) * D ** -0.5
    m = acc = l_sum = None
    for j in range(0, ks.shape[2], block):
        s = torch.matmul(qg, ks[:, :, j:j + block].transpose(-1, -2))
        m_new = s.amax(-1, keepdim=True) if m is None else torch.maximum(m, s.amax(-1, keepdim=True))
        p = torch.exp(s - m_new)
        pv = torch.matmul(p, vs[:, :, j:j + block])
        if m is None:
            acc, l_sum = pv, p.sum(-1, keepdim=True)
        else:
            a = torch.exp(m - m_new)
            acc, l_sum = acc * a + pv, l_sum * a + p.sum(-1, keepdim=True)
        m = m_new
    return (acc / l_sum).reshape(B, H, 1, D)


def _errors(T, G, D, seed, dtype=torch.float32):
    q, k, v, labels, channels = make_inputs(T, G, D, dtype, seed=seed)
    idx = ds_select_reference(q, labels, channels, budget_for(T), SINK, RECENT)
    exact = ds_attend_reference(q.double(), k.double(), v.double(), idx)
    n = max(idx.shape[-1], D)  # the longer of the two reductions (over D, over the selected tokens)
    return (rel_err(blocked_attend(q, k, v, idx), exact), rel_err(torch_same_dtype_attend(q, k, v, idx), exact), n,
            (q, k, v, idx, exact))


CASES = [(T, G, D, seed) for seed in range(10) for (T, G, D) in [(63, 1, 128), (63, 3, 64), (200, 4, 64),
                                                                  (63, 1, 64), (1000, 1, 128)]]


def test_floor_accepts_every_valid_reordering():
    ratio_only_fails = 0
    for T, G, D, seed in CASES:
        err, torch_err, n, _ = _errors(T, G, D, seed)
        ratio_only_fails += err > 2 * torch_err
        assert err <= ratio_bound(torch_err, torch.float32, n), (T, G, D, seed, err, torch_err)
    print(f"ratio-only bound rejected {ratio_only_fails}/{len(CASES)} valid reorderings")


def test_ratio_only_bound_rejects_a_valid_reordering():
    """The old bound's failure, reproduced: seed 6 at T63-G1-D128 (found by the sweep above; the
    offending case depends on the CPU's rounding, which is the point)."""
    err, torch_err, n, _ = _errors(63, 1, 128, seed=6)
    if err <= 2 * torch_err:
        pytest.skip(f"this CPU rounds the pinned case differently ({err:.2e} vs torch {torch_err:.2e})")
    assert err > 2 * torch_err                                # what the old test asserted against
    assert err <= ratio_bound(torch_err, torch.float32, n)   # the new bound accepts it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_floor_still_rejects_real_bugs(dtype):
    """The floor is no licence: a dropped token, or V rounded to bf16, is far outside the bound."""
    _, torch_err, n, (q, k, v, idx, exact) = _errors(1000, 4, 64, seed=42, dtype=dtype)
    bound = ratio_bound(torch_err, dtype, n)
    dropped = ds_attend_reference(q, k, v, idx[..., 1:])
    assert rel_err(dropped, exact) > 5 * bound
    if dtype == torch.float32:
        rounded = ds_attend_reference(q, k, v.bfloat16().float(), idx)
        assert rel_err(rounded, exact) > 5 * bound
