"""Shared inputs and checks of the Double Sparsity kernel tests (test_ds_attention_kernels.py,
test_ds_attention_cpu.py)."""
import torch

from accel.kernels.ds_attention import ds_select_reference, label_scores_reference
from kernel_tolerances import assert_within


SHAPES = [(T, G, D) for T in (63, 1000, 4097) for G in (1, 3, 4) for D in (64, 128)]
KVH = 2
SINK, RECENT = 4, 8


def shape_id(s):
    return f"T{s[0]}-G{s[1]}-D{s[2]}"


def budget_for(T):
    return max(T // 16, SINK + RECENT + 8)


def make_inputs(T, G, D, dtype=torch.float32, B=1, r=None, seed=42):
    g = torch.Generator().manual_seed(seed)
    r = r or D // 8
    q = torch.randn(B, KVH * G, 1, D, generator=g).to(dtype)
    k = torch.randn(B, KVH, T, D, generator=g).to(dtype)
    v = torch.randn(B, KVH, T, D, generator=g).to(dtype)
    channels = torch.stack([torch.randperm(D, generator=g)[:r] for _ in range(KVH)])
    labels = torch.gather(k, 3, channels[None, :, None, :].expand(B, KVH, T, r)).contiguous()
    return q, k, v, labels, channels


def torch_same_dtype_attend(q, k, v, idx, scaling=None):
    """The yardstick: plain torch ops in the input dtype over the selected tokens."""
    B, H, _, D = q.shape
    G = H // k.shape[1]
    scaling = D ** -0.5 if scaling is None else scaling
    gi = idx[..., None].expand(*idx.shape, D)
    ks, vs = torch.gather(k, 2, gi), torch.gather(v, 2, gi)
    qg = q[:, :, 0].reshape(B, -1, G, D)
    p = torch.softmax(torch.matmul(qg, ks.transpose(-1, -2)) * scaling, dim=-1)
    return torch.matmul(p, vs).reshape(B, H, 1, D)


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def assert_attend_within(out, exact, torch_err, idx, what=""):
    """Within 2x torch's error, floored at a few ulps x sqrt(the longer reduction: D or n tokens)."""
    assert_within(rel_err(out, exact), torch_err, out.dtype, max(idx.shape[-1], out.shape[-1]), what=what)


def assert_same_selection(idx, q, labels, channels, budget, key_mask=None):
    """idx must equal the fp64 reference selection, except for swaps between tokens whose fp64
    approximate scores tie at the k-th place within fp32 rounding."""
    ref = ds_select_reference(q.double(), labels.double(), channels, budget, SINK, RECENT, "max", key_mask)
    assert idx.shape == ref.shape
    s = label_scores_reference(q.double(), labels.double(), channels)
    for b in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            got, want = set(idx[b, h].tolist()), set(ref[b, h].tolist())
            assert len(got) == idx.shape[-1], "duplicate indices"
            diff = got ^ want
            if diff:
                kth = s[b, h, list(want)].min()
                for t in diff:
                    assert abs(s[b, h, t] - kth) <= 1e-5 * max(1.0, abs(kth)), f"token {t} wrongly (de)selected"
