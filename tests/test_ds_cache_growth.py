"""Double Sparsity's cache layers append in place (issue 16: DynamicLayer's per-step torch.cat of
K, V and labels was the main cost of a long-context decode step), and still follow every cache
operation transformers applies."""
import pytest
import torch

import accel
from accel.calibrate.double_sparsity import calibrate_double_sparsity
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.kernels.ds_attention import gather_labels
from accel.patches import compat
from accel.patches.ds_cache import DSLabelLayer, GrowingLayer, dequantize_labels, quantize_labels

CH = torch.tensor([[3, 0, 7], [1, 2, 5]])


def _steps(seed=42, B=3, n_prefill=63):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, 2, n, 8, generator=g), torch.randn(B, 2, n, 8, generator=g))
            for n in (n_prefill, 1, 1, 1, 2, 1)]


def _check_labels(layer):
    exp = gather_labels(layer.keys, layer.channels)
    if layer.bits < 16:
        exp = dequantize_labels(*quantize_labels(exp, layer.bits), layer.bits, exp.dtype)
    assert layer.label_length() == layer.keys.shape[2]
    torch.testing.assert_close(layer.labels(), exp, atol=0, rtol=0)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_decode_steps_write_in_place_and_match_concatenation(bits):
    layer, ref = DSLabelLayer(CH, bits=bits), compat.DynamicLayer()
    ptrs = []
    for k, v in _steps():
        keys, values = layer.update(k, v)
        rk, rv = ref.update(k, v)
        assert torch.equal(keys, rk) and torch.equal(values, rv)
        _check_labels(layer)
        ptrs.append((keys.data_ptr(), values.data_ptr(), tuple(p.data_ptr() for p in layer.label_parts)))
    # One buffer for the whole decode: no step reallocated K, V or labels.
    assert len(set(ptrs)) == 1, ptrs
    assert layer.capacity() >= layer.get_seq_length() + 200


def test_buffer_grows_with_headroom_and_keeps_the_tokens():
    layer, ref = GrowingLayer(), compat.DynamicLayer()
    g = torch.Generator().manual_seed(42)
    regrows, last = 0, None
    for n in [1000] + [1] * 300:
        k, v = torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)
        keys, _ = layer.update(k, v)
        ref.update(k, v)
        regrows += keys.data_ptr() != last
        last = keys.data_ptr()
    assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
    assert regrows == 2  # the prompt's buffer (1000 + 256 headroom), then one regrow past 1256


def test_cache_operations_follow_dynamic_layer():
    """crop / reorder / batch ops / reset / offload, each followed by more decode steps, give the
    same K/V/labels as a plain DynamicLayer (and labels stay the labels of the keys)."""
    layer, ref = DSLabelLayer(CH), compat.DynamicLayer()
    g = torch.Generator().manual_seed(42)

    def step(n=1, B=None):
        for _ in range(n):
            B = B or layer.keys.shape[0]
            k, v = torch.randn(B, 2, 1, 8, generator=g), torch.randn(B, 2, 1, 8, generator=g)
            layer.update(k, v), ref.update(k, v)
        assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
        _check_labels(layer)

    k, v = torch.randn(3, 2, 63, 8, generator=g), torch.randn(3, 2, 63, 8, generator=g)
    layer.update(k, v), ref.update(k, v)
    step(3)
    ptr = layer.keys.data_ptr()
    layer.crop(-2), ref.crop(-2)
    step(2)
    assert layer.keys.data_ptr() == ptr  # a crop keeps the buffer: the next steps overwrite its tail
    for op, arg in (("reorder_cache", torch.tensor([2, 0, 0])), ("batch_select_indices", torch.tensor([0, 2])),
                    ("batch_repeat_interleave", 2)):
        getattr(layer, op)(arg), getattr(ref, op)(arg)
        step(2)
    layer.offload(), ref.offload()
    layer.prefetch(), ref.prefetch()
    step(2)
    layer.reset()
    assert layer.label_length() == 0 and layer.get_seq_length() == 0 and layer.capacity() == 0


def test_inference_mode_cache_is_reallocated_outside_it():
    layer = DSLabelLayer(CH)
    (k0, v0), (k1, v1) = _steps()[:2]
    with torch.inference_mode():
        layer.update(k0, v0)
        layer.update(k1, v1)
    k2, v2 = _steps(seed=7)[1]
    with torch.no_grad():
        keys, _ = layer.update(k2, v2)
    assert not keys.is_inference()
    assert torch.equal(keys, torch.cat([k0, k1, k2], 2))
    _check_labels(layer)


def test_autograd_concatenates_instead_of_writing_in_place():
    layer = GrowingLayer()
    k = torch.randn(1, 2, 5, 4, requires_grad=True)
    keys, _ = layer.update(k, torch.randn(1, 2, 5, 4))
    keys2, _ = layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    keys2.sum().backward()
    assert torch.equal(k.grad, torch.ones_like(k))


def test_generate_caches_grow_in_place_in_every_layer():
    """A DS-patched model's DynamicCache: the n_dense layer is a GrowingLayer, the sparse ones
    DSLabelLayers, each decoded into one buffer; generate() equals dense at a full budget."""
    model = accel.models.tiny("llama")
    samples = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    art = calibrate_double_sparsity(model, None, DoubleSparsityConfig(budget=1.0, min_context=0, n_dense=1,
                                                                      heavy_channels=4), samples=samples,
                                    progress=False)
    ids = torch.randint(1, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        with accel.patched(model, art):
            out = model.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    layers = compat.output_cache(out).layers
    assert type(layers[0]) is GrowingLayer and all(type(x) is DSLabelLayer for x in layers[1:])
    for x in layers:
        # The prompt went straight into a buffer with headroom: every step after it wrote in place.
        assert x.capacity() >= 40 + 256 and x.keys.data_ptr() == x._kbuf.data_ptr()
    with torch.no_grad():
        again = model.generate(ids, **kw)  # unpatched: plain DynamicLayers again
    assert all(type(x) is compat.DynamicLayer for x in compat.output_cache(again).layers)
