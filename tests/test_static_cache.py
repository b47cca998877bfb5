"""`cache_implementation="static"` with patched models (issue 19): the same greedy tokens as the
dynamic cache for every method; Double Sparsity's labels as a static cache layer."""
import pytest
import torch

import accel
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.configs.gqsa import GQSAConfig
from accel.configs.prune import PruneConfig
from accel.configs.rsparse import RSparseConfig
from accel.kernels.ds_attention import ds_decode_attention, ds_decode_attention_static, gather_labels
from accel.patches import compat
from accel.patches.ds_cache import DSStaticLabelLayer, dequantize_labels, quantize_labels

DS = dict(budget=0.25, min_context=0, heavy_channels=4, n_dense=1)
CONFIGS = {
    "prune": [PruneConfig(sparsity=0.5)],
    "gqsa": [GQSAConfig(bits=4, sparsity=0.5, group_size=16, bqpo_steps=0, e2e_steps=0)],
    "rsparse": [RSparseConfig(sparsity=0.5)],
    "ds": [DoubleSparsityConfig(**DS, label_bits=16)],
    "ds-8bit-labels": [DoubleSparsityConfig(**DS, label_bits=8)],
    "ds-min-context": [DoubleSparsityConfig(**{**DS, "min_context": 16})],
}
CONFIGS["ds+gqsa"] = CONFIGS["ds"] + CONFIGS["gqsa"]


@pytest.fixture(scope="module")
def model_and_data():
    model = accel.models.tiny("llama")
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(42))
    return model, x


@pytest.mark.parametrize("method", list(CONFIGS))
def test_static_cache_gives_the_dynamic_tokens(model_and_data, method):
    model, x = model_and_data
    arts = [accel.calibrate(model, c, data=x, progress=False) for c in CONFIGS[method]]
    ids = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(42))
    am = torch.ones_like(ids)
    am[1, :3] = 0   # left padding in the second row
    kw = dict(attention_mask=am, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    try:
        for a in arts:
            accel.patch(model, a)
        with torch.inference_mode():
            dyn = model.generate(ids, **kw)
            sta = model.generate(ids, cache_implementation="static", **kw)
        if method.startswith("ds"):
            layers = compat.output_cache(sta).layers
            assert sum(isinstance(layer, DSStaticLabelLayer) for layer in layers) == 3   # n_dense=1 of 4 layers
    finally:
        accel.unpatch(model)
    assert torch.equal(sta.sequences, dyn.sequences)
    for a, b in zip(sta.scores, dyn.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_static_label_layer_labels_every_written_token():
    from transformers.cache_utils import StaticLayer

    g = torch.Generator().manual_seed(42)
    ch = torch.tensor([[1, 5, 7, 2], [0, 3, 9, 15]])
    plain = StaticLayer(max_cache_len=20)
    k0, v0 = torch.randn(1, 2, 7, 16, generator=g), torch.randn(1, 2, 7, 16, generator=g)
    plain.update(k0, v0)
    layer = DSStaticLabelLayer.from_layer(plain, ch)
    assert layer.keys is plain.keys and int(layer.cumulative_length) == 7
    k1 = torch.randn(1, 2, 1, 16, generator=g)
    layer.update(k1, torch.randn(1, 2, 1, 16, generator=g))
    lab = layer.labels()
    assert lab.shape == (1, 2, 20, 4)
    torch.testing.assert_close(lab[:, :, :8], gather_labels(torch.cat([k0, k1], 2), ch), atol=0, rtol=0)
    q8 = DSStaticLabelLayer(20, ch, bits=8)
    q8.update(k0, v0)
    want = dequantize_labels(*quantize_labels(gather_labels(k0, ch), 8), 8, k0.dtype)
    torch.testing.assert_close(q8.labels()[:, :, :7], want, atol=0, rtol=0)
    layer.reset()
    assert int(layer.cumulative_length) == 0 and not bool(layer.label_parts[0].any())


@pytest.mark.parametrize("bits", [16, 8])
def test_reorder_cache_keeps_the_label_buffers_in_place(bits):
    """Beam search reorders the cache: the static label buffers must stay the same tensors (a
    compiled step marked their addresses static; new tensors would recompile it)."""
    g = torch.Generator().manual_seed(42)
    ch = torch.tensor([[1, 5, 7, 2], [0, 3, 9, 15]])
    layer = DSStaticLabelLayer(20, ch, bits=bits)
    layer.update(torch.randn(3, 2, 7, 16, generator=g), torch.randn(3, 2, 7, 16, generator=g))
    ptrs = [p.data_ptr() for p in layer.label_parts]
    before = [p.clone() for p in layer.label_parts]
    beam = torch.tensor([2, 0, 0])
    layer.reorder_cache(beam)
    assert [p.data_ptr() for p in layer.label_parts] == ptrs
    for p, b in zip(layer.label_parts, before):
        torch.testing.assert_close(p, b[beam], atol=0, rtol=0)


@pytest.mark.parametrize("budget,min_context", [(0.25, 0), (12, 0), (0.5, 40), (0.5, 100)])
def test_static_decode_op_equals_decode_on_the_filled_prefix(budget, min_context):
    from accel.configs.double_sparsity import DoubleSparsityConfig as C

    g = torch.Generator().manual_seed(42)
    B, H, KVH, Tmax, D, r, T = 2, 4, 2, 80, 16, 4, 63
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, KVH, Tmax, D, generator=g), torch.randn(B, KVH, Tmax, D, generator=g)
    ch = torch.stack([torch.randperm(D, generator=g)[:r] for _ in range(KVH)])
    lab = gather_labels(k, ch)
    mask = torch.zeros(B, Tmax, dtype=torch.bool)
    mask[:, :T] = True
    mask[1, :4] = False
    got = ds_decode_attention_static(q, k, v, lab, ch, torch.tensor(T), budget, min_context, sink=2, recent=8,
                                     key_mask=mask)
    n = C(budget=budget, min_context=min_context).budget_tokens(T) if T >= min_context else T
    want = ds_decode_attention(q, k[:, :, :T], v[:, :, :T], lab[:, :, :T], ch, n, sink=2, recent=8,
                               key_mask=mask[:, :T], path="reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
