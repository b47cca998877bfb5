"""torch.compile of patched models (issue 19): accel's kernels as custom ops, no graph break in a
decode step, compiled greedy tokens == eager. Tiny llama only; graph-break checks use
`torch._dynamo.explain` (eager backend), token checks `aot_eager` (fake kernels + functionalization),
one bf16 check with inductor (slow)."""
import pytest
import torch

import accel
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.configs.gqsa import GQSAConfig
from accel.configs.prune import PruneConfig
from accel.configs.rsparse import RSparseConfig
from accel.kernels import ops
# Each kernel folder registers its ops (accel/kernels/<folder>/ops.py) when it is imported.
from accel.kernels import ds_attention, gqsa_linear, rsparse_linear  # noqa: F401
from accel.patches import compat

CONFIGS = {
    "prune": [PruneConfig(sparsity=0.5)],
    "gqsa": [GQSAConfig(bits=4, sparsity=0.5, group_size=16, bqpo_steps=0, e2e_steps=0)],
    "rsparse": [RSparseConfig(sparsity=0.5)],
    "ds": [DoubleSparsityConfig(budget=0.25, min_context=0, heavy_channels=4, n_dense=1)],
}
CONFIGS["ds+gqsa"] = CONFIGS["ds"] + CONFIGS["gqsa"]
METHODS = list(CONFIGS)


@pytest.fixture(scope="module")
def arts():
    model = accel.models.tiny("llama")
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(42))
    one = {k: accel.calibrate(model, v[0], data=x, progress=False) for k, v in CONFIGS.items() if len(v) == 1}
    return {k: [one[m] for m in k.split("+")] for k in CONFIGS}


def _patched(arts, method, dtype=torch.float32):
    # The artifacts were calibrated on the fp32 tiny model: cast that one (tiny(dtype=bf16) draws
    # other weights, which the fingerprint check rightly refuses).
    model = accel.models.tiny("llama").to(dtype)
    for a in arts[method]:
        accel.patch(model, a)
    return model


def _ids():
    return torch.randint(1, 512, (1, 10), generator=torch.Generator().manual_seed(42))


def test_every_op_is_registered_in_the_accel_namespace():
    for name in ops.OPS:
        assert hasattr(torch.ops.accel, name), name


def _op_cases():
    g = torch.Generator().manual_seed(42)
    B, H, KVH, T, D, r = 1, 4, 2, 63, 16, 4
    q, k, v = (torch.randn(B, n, t, D, generator=g) for n, t in ((H, 1), (KVH, T), (KVH, T)))
    ch = torch.stack([torch.randperm(D, generator=g)[:r] for _ in range(KVH)])
    lab = torch.gather(k, 3, ch[None, :, None, :].expand(B, KVH, T, r))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :5] = False
    ln = torch.tensor(50)
    idx = torch.topk(torch.randn(B, KVH, T, generator=g), 20, dim=-1).indices
    W = torch.randn(33, 40, generator=g)
    x = torch.randn(1, 40, generator=g)
    scale = W.norm(dim=0)
    thr = (0.5 / scale).float()
    yield "ds_decode", torch.ops.accel.ds_decode_attention, (q, k, v, lab, ch, None, None, 16, 0.0, 0, 4, 8, 0.25,
                                                             "max", "cpu")
    yield "ds_decode_static", torch.ops.accel.ds_decode_attention, (q, k, v, lab, ch, mask, ln, 0, 0.25, 0, 4, 8,
                                                                    0.25, "sum", "cpu")
    yield "ds_select", torch.ops.accel.ds_select, (q, lab, ch, mask, 16, 4, 8, "max", "cpu")
    yield "ds_attend", torch.ops.accel.ds_attend, (q, k, v, idx, None, 0.25, "cpu")
    yield "ds_update_labels", torch.ops.accel.ds_update_labels, (lab.clone(), k[:, :, :3], ch, torch.tensor([7, 8, 9]))
    for dt in (torch.float32, torch.bfloat16):
        yield f"rsparse_{dt}", torch.ops.accel.rsparse_linear, (x.to(dt), W.to(dt), scale, 0.5, None, None, None,
                                                               W.t().contiguous().to(dt), thr, "cpu")


@pytest.mark.parametrize("case", list(_op_cases()), ids=lambda c: c[0])
def test_opcheck(case):
    """Schema, fake (meta) implementation and autograd registration agree with the real kernel."""
    _, op, args = case
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_opcheck_gqsa_native():
    from accel.kernels.gqsa_linear import cpp_ext
    from accel.kernels.gqsa_linear.format import pack_weight

    if not cpp_ext.available():
        pytest.skip("no native GQSA kernel on this machine")
    g = torch.Generator().manual_seed(42)
    w = pack_weight(torch.randn(33, 64, generator=g), sparsity=0.5, group_size=16)
    x = torch.randn(3, 64, generator=g).bfloat16()
    torch.library.opcheck(torch.ops.accel.gqsa_linear,
                          (x, w.qweight, w.colmask, None, w.scales, w.zeros, None, 64, 16, 4, 1, "cpu-avx512", 0, 0, ""),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("method", METHODS)
def test_decode_step_has_no_graph_break(arts, method, static):
    """Before issue 19, DS broke the graph on its C++ kernels and on Tensor.item() (bool(mask.all()))."""
    from transformers import DynamicCache, StaticCache

    model = _patched(arts, method)
    ids = _ids()
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=24) if static else DynamicCache(config=model.config)
        nxt = model(ids, **compat.cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(model)(nxt, **compat.cache_kwargs(cache))
    assert ex.graph_break_count == 0, [str(b.reason)[:200] for b in ex.break_reasons]
    assert ex.graph_count == 1


def _gen(model, n=6, **kw):
    with torch.inference_mode():
        return model.generate(_ids(), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_compiled_greedy_tokens_equal_eager_fp32(arts, method):
    model = _patched(arts, method)
    ref = _gen(model)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    info = accel.compile(model, backend="aot_eager", max_cache_len=24)
    assert info.seconds > 0 and not info.reused
    # The warm-up generate() compiled a decode graph (equal tokens alone would pass uncompiled).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    out = _gen(model)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # The second call in the process reuses the compiled step.
    again = accel.compile(model, backend="aot_eager", max_cache_len=24)
    assert again.reused and again.seconds == info.seconds


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_inductor_greedy_tokens_equal_eager_fp32(arts, method):
    """What users run (inductor, the default backend): fp32 greedy tokens equal eager's for every method."""
    model = _patched(arts, method)
    ref = _gen(model)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    accel.compile(model, backend="inductor", max_cache_len=24)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    out = _gen(model)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_reuse_reapplies_generation_config_settings():
    """A reused compile skips only the warm-up: settings the user changed since are set again."""
    model = accel.models.tiny("llama")
    first = accel.compile(model, backend="aot_eager", max_cache_len=24, warmup=False)
    gc = model.generation_config
    gc.cache_implementation, gc.compile_config, gc.max_cache_len = "dynamic", None, 8
    again = accel.compile(model, backend="aot_eager", max_cache_len=24, warmup=False)
    assert again.reused and not first.reused
    assert gc.cache_implementation == "static" and gc.max_cache_len == 24
    assert gc.compile_config is not None and gc.compile_config.backend == "aot_eager"


def _assert_scores_close(out, ref):
    """bf16 logits of every step within tolerance of the reference run's, compared only while both
    runs have fed the same tokens (bf16 may flip a near-tie); at least two steps compared."""
    P = _ids().shape[1]
    for i, (a, b) in enumerate(zip(out.scores, ref.scores)):
        if not torch.equal(out.sequences[:, :P + i], ref.sequences[:, :P + i]):
            break
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)
    assert i >= 1


@pytest.mark.slow
def test_inductor_bf16_logits_within_tolerance(arts):
    """DS + GQSA in bf16 through inductor: logits of every step within bf16's tolerance of eager."""
    model = _patched(arts, "ds+gqsa", dtype=torch.bfloat16)
    ref = _gen(model, n=4)
    torch._dynamo.reset()
    accel.compile(model, backend="inductor", max_cache_len=24)
    _assert_scores_close(_gen(model, n=4), ref)


def _dense_linear_available():
    from accel.kernels.dense_linear import cpp_ext

    return cpp_ext.available()


needs_dense_kernel = pytest.mark.skipif(not _dense_linear_available(), reason="needs the AVX512-BF16 dense kernel")


def _graph_targets(model, cache_len=24):
    """The call targets of the single graph Dynamo traces for one static-cache decode step."""
    from transformers import StaticCache

    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=cache_len)
        nxt = model(_ids(), **compat.cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(model)(nxt, **compat.cache_kwargs(cache))
    assert ex.graph_break_count == 0 and ex.graph_count == 1
    # Dynamo records an op by its packet (torch.ops.accel.dense_linear) or an overload of it.
    return [getattr(n.target, "overloadpacket", n.target) for n in ex.graphs[0].graph.nodes if n.op == "call_function"]


@needs_dense_kernel
def test_fast_linears_swapped_tied_and_undone():
    """accel.compile makes every plain bf16 linear a FastLinear in place: same modules, same
    Parameters (a tied lm_head still shares the embedding's), same state_dict; fast_linears=False
    puts nn.Linear back."""
    from torch import nn

    from accel.patches.fast_linear import FastLinear

    model = accel.models.tiny("llama", dtype=torch.bfloat16, tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    info = accel.compile(model, backend="aot_eager", max_cache_len=24, warmup=False)
    assert info.fast_linears == len(linears) == 4 * 7 + 1
    assert all(type(model.get_submodule(n)) is FastLinear and model.get_submodule(n) is m for n, m in linears.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    # The compiled decode step calls the C++ op (no Python body), for every linear.
    targets = _graph_targets(model)
    assert targets.count(torch.ops.accel.dense_linear) == len(linears)
    off = accel.compile(model, backend="aot_eager", max_cache_len=24, warmup=False)
    assert off.reused
    off = accel.compile(model, backend="aot_eager", max_cache_len=24, warmup=False, fast_linears=False)
    assert off.fast_linears == 0 and not off.reused
    assert all(type(m) is nn.Linear for m in linears.values())
    assert torch.ops.accel.dense_linear not in _graph_targets(model)


@needs_dense_kernel
def test_fast_linears_compiled_bf16_match_eager_and_patching_still_works(arts):
    """A GQSA-patched bf16 model: only the lm_head is left plain, it becomes a FastLinear; the
    compiled steps' logits are within bf16 tolerance of eager (plain nn.Linear); accel.report
    and accel.unpatch still see the patch, and the model can be patched again."""
    from torch import nn

    from accel.patches.fast_linear import FastLinear

    model = _patched(arts, "gqsa", dtype=torch.bfloat16)
    report = accel.report(model).rows
    ref = _gen(model, n=4)
    torch._dynamo.reset()
    info = accel.compile(model, backend="aot_eager", max_cache_len=24)
    assert info.fast_linears == 1 and type(model.lm_head) is FastLinear
    _assert_scores_close(_gen(model, n=4), ref)
    assert accel.report(model).rows == report
    accel.unpatch(model)
    projs = [m for n, m in model.named_modules() if n.endswith("_proj")]
    assert len(projs) == 4 * 7 and all(type(m) is nn.Linear for m in projs)
    accel.patch(model, arts["gqsa"][0])
    assert type(model.lm_head) is FastLinear


@needs_dense_kernel
def test_fast_lm_head_saves_the_same_checkpoint(arts, tmp_path):
    """accel.save_pretrained of a GQSA-patched bf16 model writes the same tensors and config with a
    FastLinear lm_head as without (the swap is not part of any checkpoint)."""
    from safetensors.torch import load_file

    from accel.patches.fast_linear import FastLinear

    model = _patched(arts, "gqsa", dtype=torch.bfloat16)
    accel.save_pretrained(model, tmp_path / "plain")
    accel.compile(model, backend="aot_eager", max_cache_len=24, warmup=False)
    assert type(model.lm_head) is FastLinear
    accel.save_pretrained(model, tmp_path / "fast")
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "fast").iterdir())
    for name in files:
        a, b = tmp_path / "plain" / name, tmp_path / "fast" / name
        if name.endswith(".safetensors"):
            ta, tb = load_file(a), load_file(b)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        elif name == "config.json":
            assert a.read_text() == b.read_text()
