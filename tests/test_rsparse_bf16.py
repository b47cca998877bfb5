"""The native R-Sparse decode kernel (`accel::rsparse_decode`, C++ op): bf16 (AVX512-BF16) and fp32
against the fp64 spec on odd shapes, the op's registration (opcheck), and that bf16 decode of a
patched linear reaches it, eager and inside a compiled graph (issue 16: bf16 decode was slower than
dense because the native kernel was fp32-only; issue 19: no Python dispatch in compiled graphs)."""
import pytest
import torch
from torch import nn

from accel.kernels.rsparse_linear import cpp_ext, rsparse_linear_ref
from accel.kernels.rsparse_linear.cpu import rsparse_linear_cpu
from accel.kernels.rsparse_linear.reference import channel_thresholds
from kernel_tolerances import assert_within, rel_err


@pytest.fixture(scope="module", autouse=True)
def native():
    import shutil

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: R-Sparse decode keeps its torch paths")
    assert cpp_ext.available(), "a C++ compiler is present but the R-Sparse kernel did not build"
    if not cpp_ext.bf16_available():
        pytest.skip("this CPU has no AVX512-BF16: bf16 decode keeps the embedding-bag path")


def _case(out_f, in_f, r, tokens, active=0.5, seed=42):
    """fp64 tensors (x, w, scale, down, up, bias) and the threshold giving `active` of the channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, in_f, generator=g, dtype=torch.float64)
    down = torch.randn(r, in_f, generator=g, dtype=torch.float64) / in_f ** 0.5
    up = torch.randn(out_f, r, generator=g, dtype=torch.float64)
    bias = torch.randn(out_f, generator=g, dtype=torch.float64)
    scale = w.float().norm(dim=0)
    score = x.float().abs() * scale
    thr = float("inf") if active == 0 else (0.0 if active == 1 else float(score.quantile(1 - active)))
    return x, w, scale, down, up, bias, thr


SHAPES = [(1000, 63, 5, 1), (63, 1000, 0, 1), (1000, 63, 0, 3), (33, 40, 3, 8), (7, 1, 1, 1), (577, 577, 9, 2)]


@pytest.mark.parametrize("active", [0.5, 0.0, 1.0], ids=["half", "none", "all"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16_decode_matches_reference(shape, with_bias, active):
    out_f, in_f, r, tokens = shape
    x, w, scale, down, up, bias, thr = _case(out_f, in_f, r, tokens, active)
    b = bias if with_bias else None
    xb, wb, db, ub = (t.bfloat16() for t in (x, w, down, up))
    bb = b.bfloat16() if b is not None else None
    lr = (db, ub) if r else (None, None)
    # The spec in fp64 on the bf16-rounded inputs (same active set as every path: fp32 thresholds).
    ref = rsparse_linear_ref(xb.double(), wb.double(), scale.double(), thr, *((db.double(), ub.double()) if r else
                             (None, None)), None if bb is None else bb.double())
    got = cpp_ext.rsparse_decode(xb, channel_thresholds(scale, thr), wb.t().contiguous(), lr[0],
                                 ub.t().contiguous() if r else None, bb)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, out_f)
    torch_err = rel_err(rsparse_linear_ref(xb, wb, scale, thr, *lr, bb), ref)
    assert_within(rel_err(got, ref), torch_err, torch.bfloat16, in_f + r, what=f"bf16 decode {shape}")


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_fp32_decode_op_matches_reference(shape):
    out_f, in_f, r, tokens = shape
    x, w, scale, down, up, bias, thr = (t.float() if torch.is_tensor(t) else t for t in _case(out_f, in_f, r, tokens))
    ref = rsparse_linear_ref(x.double(), w.double(), scale.double(), thr, down.double(), up.double(), bias.double())
    got = torch.ops.accel.rsparse_decode(x, channel_thresholds(scale, thr), w.t().contiguous(), down if r else None,
                                         up.t().contiguous() if r else None, bias, 4)
    torch_err = rel_err(rsparse_linear_ref(x, w, scale, thr, down, up, bias), ref)
    assert_within(rel_err(got, ref), torch_err, torch.float32, in_f + r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_opcheck_rsparse_decode(dtype):
    x, w, scale, down, up, bias, thr = _case(33, 40, 3, 2)
    args = (x.to(dtype), channel_thresholds(scale, thr), w.t().contiguous().to(dtype), down.to(dtype),
            up.t().contiguous().to(dtype), bias.to(dtype), 4)
    torch.library.opcheck(torch.ops.accel.rsparse_decode, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_bad_input_names_the_problem():
    x, w, scale, *_ = _case(33, 40, 0, 1)
    thr = channel_thresholds(scale, 0.5)
    with pytest.raises(RuntimeError, match="differ in dtype"):
        torch.ops.accel.rsparse_decode(x.bfloat16(), thr, w.t().contiguous().float(), None, None, None, 4)
    with pytest.raises(RuntimeError, match="up_t"):
        d = torch.zeros(3, 40, dtype=torch.bfloat16)
        torch.ops.accel.rsparse_decode(x.bfloat16(), thr, w.t().contiguous().bfloat16(), d,
                                       torch.zeros(33, 3, dtype=torch.bfloat16), None, 4)


def _patched_linear(out_f=63, in_f=100, r=5):
    from accel.patches.rsparse import RSparseLinear

    x, w, scale, down, up, bias, thr = _case(out_f, in_f, r, 1)
    lin = nn.Linear(in_f, out_f).bfloat16()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    return RSparseLinear(lin, thr, scale, down.bfloat16(), up.bfloat16(), 0.5, 0.9), x.bfloat16()


def test_patched_bf16_decode_uses_the_native_op(monkeypatch):
    """Before: bf16 decode ran F.embedding_bag + addmv (slower than dense bf16 at SmolLM2's sizes)."""
    mod, x = _patched_linear()
    calls = []
    real = cpp_ext.rsparse_decode
    monkeypatch.setattr(cpp_ext, "rsparse_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.inference_mode():
        y = mod(x[None])
    assert calls, "bf16 decode did not reach the native kernel"
    ref = rsparse_linear_ref(x.double(), mod.weight.double(), mod.scale.double(), mod.threshold, mod.down.double(),
                             mod.up.double(), mod.bias.double())
    assert y.shape == (1, 1, 63)
    assert rel_err(y[0], ref) < 1e-2


def test_compiled_decode_calls_the_cpp_op_without_python_dispatch():
    """A compiled bf16 decode step holds accel::rsparse_decode itself, not the Python custom op
    accel::rsparse_linear (whose body would run Python per linear) and no graph break."""
    mod, x = _patched_linear()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.inference_mode():
        eager = mod(x[None])
        compiled = torch.compile(mod, backend=backend, fullgraph=True)(x[None])
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("rsparse_decode" in t for t in targets), targets
    assert not any("rsparse_linear" in t for t in targets), targets
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_cpu_entry_bf16_multi_token_matches_reference():
    # 3 decode tokens (speculative / batch): each token has its own active set.
    x, w, scale, down, up, bias, thr = _case(1000, 63, 5, 3)
    xb, wb, db, ub, bb = (t.bfloat16() for t in (x, w, down, up, bias))
    got = rsparse_linear_cpu(xb[None], wb, scale, thr, db, ub, bb, weight_t=wb.t().contiguous(),
                             thr_vec=channel_thresholds(scale, thr))
    ref = rsparse_linear_ref(xb.double(), wb.double(), scale.double(), thr, db.double(), ub.double(), bb.double())
    torch_err = rel_err(rsparse_linear_ref(xb, wb, scale, thr, db, ub, bb), ref)
    assert got.shape == (1, 3, 1000)
    assert_within(rel_err(got[0], ref), torch_err, torch.bfloat16, 63 + 5)


@pytest.mark.parametrize("shape", [(1000, 63, 5, 63), (63, 1000, 0, 9), (33, 40, 3, 100)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bf16_prefill_one_gemm_matches_reference(shape, monkeypatch):
    """Many tokens: [x_S | down·x_rest] @ [Wᵀ; U_rᵀ] in one GEMM, within the bf16 bound of the spec."""
    out_f, in_f, r, tokens = shape
    x, w, scale, down, up, bias, thr = _case(out_f, in_f, r, tokens)
    xb, wb, db, ub, bb = (t.bfloat16() for t in (x, w, down, up, bias))
    lr = (db, ub) if r else (None, None)
    stacked = torch.cat([wb.t(), ub.t()]).contiguous() if r else wb.t().contiguous()
    calls = []
    real = cpp_ext.prefill_bf16
    monkeypatch.setattr(cpp_ext, "prefill_bf16", lambda *a: calls.append(1) or real(*a))
    got = rsparse_linear_cpu(xb, wb, scale, thr, *lr, bb, weight_t=stacked, thr_vec=channel_thresholds(scale, thr))
    assert calls, "bf16 prefill did not take the one-GEMM path"
    ref = rsparse_linear_ref(xb.double(), wb.double(), scale.double(), thr,
                             *((db.double(), ub.double()) if r else (None, None)), bb.double())
    torch_err = rel_err(rsparse_linear_ref(xb, wb, scale, thr, *lr, bb), ref)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, out_f)
    assert_within(rel_err(got, ref), torch_err, torch.bfloat16, in_f + r, what=f"bf16 prefill {shape}")


def test_patched_bf16_prefill_and_decode_agree_with_the_spec():
    # The module's stacked [Wᵀ; U_rᵀ] feeds both paths; 20 tokens (prefill) then 1 (decode).
    mod, _ = _patched_linear()
    x = torch.randn(1, 20, 100, generator=torch.Generator().manual_seed(42)).bfloat16()
    ref = rsparse_linear_ref(x.double(), mod.weight.double(), mod.scale.double(), mod.threshold, mod.down.double(),
                             mod.up.double(), mod.bias.double())
    with torch.inference_mode():
        pre, dec = mod(x), mod(x[:, -1:])
    tb = rsparse_linear_ref(x, mod.weight, mod.scale, mod.threshold, mod.down, mod.up, mod.bias)
    assert_within(rel_err(pre, ref), rel_err(tb, ref), torch.bfloat16, 105, what="prefill")
    assert_within(rel_err(dec, ref[:, -1:]), rel_err(tb[:, -1:], ref[:, -1:]), torch.bfloat16, 105, what="decode")
    assert mod.stacked_t().shape == (128, 63) and mod.weight_t().data_ptr() == mod.stacked_t().data_ptr()


def test_patched_tiny_bf16_decode_step_compiles_without_graph_break():
    """A whole decode step of a patched bf16 model (static cache): one graph, no break, and the
    C++ op in it (issue 19)."""
    from transformers import StaticCache

    import accel
    from accel.configs.rsparse import RSparseConfig
    from accel.patches import compat

    model = accel.models.tiny("llama")
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(42))
    art = accel.calibrate(model, RSparseConfig(sparsity=0.5), data=x, progress=False)
    model = model.to(torch.bfloat16)
    accel.patch(model, art)
    ids = x[:1, :10]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=24)
        nxt = model(ids, **compat.cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(model)(nxt, **compat.cache_kwargs(cache))
        torch._dynamo.reset()
        torch.compile(model, backend=backend)(nxt, **compat.cache_kwargs(cache))
    assert ex.graph_break_count == 0, [str(b.reason)[:200] for b in ex.break_reasons]
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("rsparse_decode" in t for t in targets) == 7 * 4, targets


def test_bench_speed_artifact_patches_with_the_planned_active_fraction():
    import accel
    from accel.configs.rsparse import rank_for
    from accel.eval.bench_rsparse import speed_artifact
    from accel.patches.rsparse import RSparseLinear

    model = accel.models.tiny("llama")
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(42))
    state = torch.random.get_rng_state()
    art = speed_artifact(model, ids, 0.5, 0.95)
    assert torch.equal(torch.random.get_rng_state(), state), "speed_artifact changed the global RNG"
    active = []
    with accel.patched(model, art):
        mods = [m for m in model.modules() if isinstance(m, RSparseLinear)]
        hooks = [m.register_forward_hook(lambda mod, i, o: active.append(
            float((i[0].float().abs() > mod.thr_vec).float().mean()))) for m in mods]
        with torch.no_grad():
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        assert len(mods) == 28 and all(m.rank == rank_for(m.in_features, m.out_features, 0.5, 0.95) for m in mods)
        assert any(m.rank > 0 for m in mods)
    # Thresholds from the dense model on these inputs: layer 0's q/k/v (called first) see exactly
    # those inputs, (1 - 0.5) * 0.95 = 0.475 active; later linears see patched upstream layers.
    assert all(abs(a - 0.475) < 0.005 for a in active[:3]), active[:3]
    assert all(abs(a - 0.475) < 0.1 for a in active), active


@pytest.mark.parametrize("seed", range(42, 54))
def test_bf16_native_random_shapes(seed):
    """Random shapes, ranks, token counts (decode <= 8 < prefill), bias and active fractions."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    out_f, in_f = pick(1, 300), pick(1, 300)
    r, tokens = pick(0, min(out_f, in_f, 20)), [1, 2, 5, 8, 9, 33][pick(0, 5)]
    active = [0.0, 0.3, 0.5, 0.8, 1.0][pick(0, 4)]
    x, w, scale, down, up, bias, thr = _case(out_f, in_f, r, tokens, active, seed)
    xb, wb, db, ub = (t.bfloat16() for t in (x, w, down, up))
    bb = bias.bfloat16() if pick(0, 1) else None
    lr = (db, ub) if r else (None, None)
    stacked = torch.cat([wb.t(), ub.t()]).contiguous()
    wt = stacked if tokens > 8 else stacked[:in_f]
    got = rsparse_linear_cpu(xb, wb, scale, thr, *lr, bb, weight_t=wt, thr_vec=channel_thresholds(scale, thr),
                             up_t=stacked[in_f:] if r else None)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = rsparse_linear_ref(xb.double(), wb.double(), scale.double(), thr, *(d(t) for t in lr), d(bb))
    torch_err = rel_err(rsparse_linear_ref(xb, wb, scale, thr, *lr, bb), ref)
    assert got.shape == (tokens, out_f)
    assert_within(rel_err(got, ref), torch_err, torch.bfloat16, in_f + r, what=f"{out_f}x{in_f} r{r} T{tokens}")


@pytest.mark.slow
def test_inductor_bf16_rsparse_matches_eager():
    """accel.compile (inductor, static cache) of a patched bf16 model: the compiled C++ op gives
    eager's logits (same kernel) and tokens."""
    import accel
    from accel.configs.rsparse import RSparseConfig

    model = accel.models.tiny("llama")
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(42))
    art = accel.calibrate(model, RSparseConfig(sparsity=0.5), data=x, progress=False)
    model = model.to(torch.bfloat16)
    accel.patch(model, art)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with torch.inference_mode():
        ref = model.generate(x[:1, :10], cache_implementation="static", **kw)
    torch._dynamo.reset()
    accel.compile(model, backend="inductor", max_cache_len=24)
    with torch.inference_mode():
        out = model.generate(x[:1, :10], **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)
