"""The native dense decode attention (accel/kernels/ds_attention/dense_cpu.py) against the fp64
spec (`dense_decode_reference`), bounded by torch's own SDPA error on the same inputs, on odd
context lengths, GQA/MQA/MHA groupings, padded batches and views of caches grown in place."""
import pytest
import torch
import torch.nn.functional as F

from accel.kernels.ds_attention import dense_cpu
from accel.kernels.ds_attention.reference import dense_decode_reference

from kernel_tolerances import assert_within, rel_err

pytestmark = pytest.mark.skipif(dense_cpu.load() is None, reason="no C++ compiler for the native kernel")


def _case(B, H, KVH, T, D, dtype, cap=None, seed=42):
    g = torch.Generator().manual_seed(seed)
    cap = cap or T
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    # A cache grown in place: [B, KVH, capacity, D] buffers, the first T rows filled.
    kb = torch.randn(B, KVH, cap, D, generator=g).to(dtype)
    vb = torch.randn(B, KVH, cap, D, generator=g).to(dtype)
    return q, kb[:, :, :T], vb[:, :, :T]


def _sdpa(q, k, v, scaling, mask=None):
    G = q.shape[1] // k.shape[1]
    attn = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=attn,
                                          scale=scaling)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,H,KVH,T,D", [(1, 9, 3, 63, 64), (1, 9, 3, 1000, 64), (2, 14, 2, 257, 64),
                                         (1, 4, 1, 1000, 256), (1, 4, 4, 1, 32), (1, 9, 3, 8192, 64)],
                         ids=["smollm2-T63", "smollm2-T1000", "qwen-B2-T257", "gemma-mqa-T1000", "mha-T1",
                              "smollm2-T8192"])
def test_dense_decode_matches_the_spec(dtype, B, H, KVH, T, D):
    q, k, v = _case(B, H, KVH, T, D, dtype, cap=T + 37)
    assert dense_cpu.usable(q, k, v)
    s = D ** -0.5
    ref = dense_decode_reference(q.double(), k.double(), v.double(), s)
    got = dense_cpu.dense_decode(q, k, v, s)
    assert got.shape == (B, H, 1, D) and got.dtype == dtype
    assert_within(rel_err(got, ref), rel_err(_sdpa(q, k, v, s), ref), dtype, T, what=f"{dtype} T={T}")


@pytest.mark.parametrize("chunk", [1, 7, 256, 5000], ids=lambda c: f"chunk{c}")
def test_every_chunking_gives_the_spec(chunk):
    q, k, v = _case(1, 9, 3, 1000, 64, torch.bfloat16)
    ref = dense_decode_reference(q.double(), k.double(), v.double(), 0.125)
    got = dense_cpu.dense_decode(q, k, v, 0.125, chunk=chunk)
    assert_within(rel_err(got, ref), rel_err(_sdpa(q, k, v, 0.125), ref), torch.bfloat16, 1000, what=f"chunk {chunk}")


def test_key_mask_padded_batch_and_a_fully_masked_chunk():
    q, k, v = _case(2, 9, 3, 1000, 64, torch.bfloat16)
    mask = torch.ones(2, 1000, dtype=torch.bool)
    # Left padding of sequence 0 covers the first chunks entirely; a hole in sequence 1.
    mask[0, :600] = False
    mask[1, 300:310] = False
    ref = dense_decode_reference(q.double(), k.double(), v.double(), 0.125, key_mask=mask)
    got = dense_cpu.dense_decode(q, k, v, 0.125, key_mask=mask)
    assert_within(rel_err(got, ref), rel_err(_sdpa(q, k, v, 0.125, mask), ref), torch.bfloat16, 1000, what="masked")
    # Every key masked: zeros (the reference's convention), not NaN.
    none = torch.zeros(2, 1000, dtype=torch.bool)
    assert torch.equal(dense_cpu.dense_decode(q, k, v, 0.125, key_mask=none), torch.zeros_like(q))


def test_same_answer_on_any_thread_count():
    q, k, v = _case(1, 9, 3, 4099, 64, torch.bfloat16)
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(dense_cpu.dense_decode(q, k, v, 0.125))
    finally:
        torch.set_num_threads(old)
    # The chunking does not depend on the thread count: bit-identical.
    assert torch.equal(outs[0], outs[1])


def test_layouts_it_does_not_take():
    q, k, v = _case(1, 9, 3, 63, 64, torch.bfloat16)
    assert not dense_cpu.usable(q, k.transpose(2, 3).contiguous().transpose(2, 3), v)  # rows not contiguous
    assert not dense_cpu.usable(q, k.float(), v)                                        # mixed dtypes
    assert not dense_cpu.usable(torch.cat([q, q], 2), k, v)                              # two query rows


def test_ds_patched_model_decodes_its_dense_layers_natively():
    """The first n_dense layers had no handler (SDPA at every step: ~4 ms a layer at 8K on
    SmolLM2); they now get a dense handler whose CPU decode steps take the native kernel, with the
    same tokens and logits as the unpatched model when DS's budget covers the whole context."""
    import accel
    from accel.calibrate.double_sparsity import calibrate_double_sparsity
    from accel.configs.double_sparsity import DoubleSparsityConfig
    from accel.patches import compat
    from accel.patches.ds_handler import DSAttention, DSDenseLayer

    model = accel.models.tiny("llama")
    g = torch.Generator().manual_seed(42)
    art = calibrate_double_sparsity(model, None, DoubleSparsityConfig(budget=1.0, n_dense=1, min_context=0),
                                    samples=torch.randint(0, 512, (2, 32), generator=g), progress=False)
    ids = torch.randint(1, 512, (1, 21), generator=g)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        ref = model.generate(ids, **kw)
        with accel.patched(model, art):
            out = model.generate(ids, **kw)
            hs = [layer.self_attn.__dict__.get("_accel_attention") for layer in compat.decoder_layers(model)]
            rows = [r for r in accel.report(model).rows if r["kind"] == "attention"]
    assert isinstance(hs[0], DSDenseLayer) and all(isinstance(h, DSAttention) for h in hs[1:])
    assert hs[0].counts["dense_decode"] == 7, hs[0].counts
    assert "first n_dense" in rows[0]["detail"] and "budget=" in rows[1]["detail"]
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
