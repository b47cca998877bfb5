"""Two threads, each with its own patched model, give exactly the single-thread results.

One case per method, on the CPU kernels (the default path on CPU). Each thread owns a model and
its own inputs, so any process-wide scratch shared between the two shows up as a wrong logit.
GQSA runs 2 x 200 = 400-row inputs (>= PREFILL_ROWS = 64: the dequantize-blocks + GEMM path, which
once shared one process-wide buffer) as well as a decode step; Double Sparsity runs decode steps
through the sparse kernel with a left-padded batch (the torch gather path with reused buffers).
"""
import threading

import pytest
import torch

import accel
from accel.artifact import Artifact
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.configs.gqsa import GQSAConfig
from accel.configs.prune import PruneConfig
from accel.configs.rsparse import RSparseConfig
from accel.patches import compat
from accel.patches.prune import pack_mask
from accel.patches.targets import iter_linears

REPEATS = 10
T = 40
T_GQSA = 200  # 400-row prefill: long enough GEMMs for the threads to overlap


def _prune(model):
    g = torch.Generator().manual_seed(0)
    tensors = {f"prune/{n}": pack_mask(torch.rand(lin.weight.shape, generator=g) > 0.5)
               for n, lin in iter_linears(model)}
    return Artifact.for_model(model, [PruneConfig(init="magnitude")], tensors)


def _gqsa(model):
    from accel.calibrate.gqsa import rtn_artifact
    return rtn_artifact(model, GQSAConfig(bits=4, sparsity=0.5, group_size=16))


def _rsparse(model):
    tensors = {}
    for n, _ in iter_linears(model):
        tensors[f"rsparse/{n}.threshold"] = torch.tensor(0.05)
        tensors[f"rsparse/{n}.s_rho"] = torch.tensor([0.5, 1.0])
    return Artifact.for_model(model, [RSparseConfig()], tensors)


def _ds(model):
    tc = compat.text_config(model.config)
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.stack([torch.randperm(tc.head_dim, generator=g) for _ in range(tc.num_key_value_heads)])
                         for _ in range(tc.num_hidden_layers)])
    cfg = DoubleSparsityConfig(budget=8, sink=2, recent=4, n_dense=1, min_context=16, heavy_channels=4)
    return Artifact.for_model(model, [cfg], {"double-sparsity/order_qk": order})


BUILDERS = {"prune": _prune, "gqsa": _gqsa, "rsparse": _rsparse, "double_sparsity": _ds}


def _inputs(seed, T=T):
    ids = torch.randint(1, 512, (2, T), generator=torch.Generator().manual_seed(seed))
    am = torch.ones_like(ids)
    am[1, :5] = 0  # left padding: masked paths run too
    return ids, am


def _run(model, ids, am):
    """Prefill logits, then three greedy decode steps' logits (through the KV cache)."""
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=am, use_cache=True)
        res = [out.logits]
        cache, nxt = compat.output_cache(out), out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            am = torch.cat([am, torch.ones_like(nxt)], 1)
            out = model(input_ids=nxt, attention_mask=am, use_cache=True, **compat.cache_kwargs(cache))
            res.append(out.logits)
            cache, nxt = compat.output_cache(out), out.logits[:, -1:].argmax(-1)
    return res


@pytest.mark.parametrize("method", list(BUILDERS))
def test_two_threads_match_single_thread(method, one_thread):
    models, inputs = [], []
    for seed in (1, 2):
        model = accel.models.tiny("llama", seed=seed)
        accel.patch(model, BUILDERS[method](model))
        models.append(model)
        inputs.append(_inputs(seed, T_GQSA if method == "gqsa" else T))
    want = [_run(m, *x) for m, x in zip(models, inputs)]
    if method == "gqsa":
        from accel.kernels.gqsa_linear import cpp_ext
        kernels = {r["kernel"] for r in accel.report(models[0]).rows}
        assert kernels == ({"cpu-avx512"} if cpp_ext.available() else {"cpu-dequant"}), kernels

    wrong = [0, 0]
    errors = []
    barrier = threading.Barrier(2)

    def worker(i):
        try:
            torch.set_num_threads(1)  # the intra-op split must match the single-thread run's
            barrier.wait()
            for _ in range(REPEATS):
                got = _run(models[i], *inputs[i])
                wrong[i] += sum(not torch.equal(a, b) for a, b in zip(got, want[i]))
        except Exception as e:  # surfaced below: an exception in a thread would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert wrong == [0, 0], f"{method}: forwards differing from the single-thread run, per thread: {wrong}"
    for m in models:
        accel.unpatch(m)
