"""Patch state: deepcopy of a patched model, stacking rules, re-patching, `patched()` nesting.

The builders here (`prune_art`, `gqsa_art`, `rsparse_art`, `ds_art`) make tiny artifacts without
calibration; tests/test_bad_input_patch.py imports them.
"""
import copy

import pytest
import torch
from torch import nn

import accel
from accel.artifact import Artifact
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.configs.gqsa import GQSAConfig
from accel.configs.prune import PruneConfig
from accel.configs.rsparse import RSparseConfig
from accel.patches import compat
from accel.patches.core import state_of
from accel.patches.prune import pack_mask
from accel.patches.targets import iter_linears

# Few-token budget so the sparse scoring path really runs on a 45-token forward.
DS_BASE = dict(budget=8, sink=2, recent=4, n_dense=1, min_context=16, heavy_channels=4)


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    # The reference paths need no native build; these tests are about patch state, not kernels.
    monkeypatch.setenv("ACCEL_KERNEL", "reference")


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def tokens(T=45, seed=42):
    return torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(seed))


def prune_art(model, seed=0, **cfg):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"prune/{n}": pack_mask(torch.rand(lin.weight.shape, generator=g) > 0.5)
               for n, lin in iter_linears(model)}
    return Artifact.for_model(model, [PruneConfig(init="magnitude", **cfg)], tensors)


def gqsa_art(model, **cfg):
    from accel.calibrate.gqsa import rtn_artifact
    return rtn_artifact(model, GQSAConfig(bits=4, sparsity=0.5, group_size=16, **cfg))


def rsparse_art(model, **cfg):
    tensors = {}
    for n, lin in iter_linears(model):
        tensors[f"rsparse/{n}.threshold"] = torch.tensor(0.05)
        tensors[f"rsparse/{n}.s_rho"] = torch.tensor([0.5, 1.0])
    return Artifact.for_model(model, [RSparseConfig(**cfg)], tensors)


def ds_order(model, seed=0):
    tc = compat.text_config(model.config)
    L, KVH, D = tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(D, generator=g) for _ in range(KVH)]) for _ in range(L)])


def ds_art(model, order=None, **cfg):
    order = ds_order(model) if order is None else order
    return Artifact.for_model(model, [DoubleSparsityConfig(**{**DS_BASE, **cfg})],
                              {"double-sparsity/order_qk": order})


BUILDERS = {"identity": lambda m: accel.IdentityConfig(), "prune": prune_art, "gqsa": gqsa_art,
            "rsparse": rsparse_art, "double-sparsity": ds_art, "ds+prune": None}


def build(name, model):
    if name == "ds+prune":
        d, p = ds_art(model), prune_art(model)
        return Artifact.for_model(model, d.configs + p.configs, {**d.tensors, **p.tensors})
    return BUILDERS[name](model)


def module_types(model):
    return {n: type(m) for n, m in model.named_modules()}


# ---- deepcopy -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(BUILDERS))
@pytest.mark.parametrize("first", ["copy", "original"])
def test_deepcopy_of_patched_model_unpatches_independently(method, first):
    model = accel.models.tiny("llama")
    x = tokens()
    fresh = copy.deepcopy(model)  # a dense model never patched
    dense = logits(model, x)
    accel.patch(model, build(method, model))
    patched = logits(model, x)
    impl = model.config._attn_implementation

    cp = copy.deepcopy(model)
    assert accel.is_patched(cp)
    assert torch.equal(logits(cp, x), patched)
    # The copy's report rows point at the copy's modules, not the original's.
    rows = state_of(cp).rows
    assert [r.module for r in rows] == [r.module for r in state_of(model).rows]
    for r in rows:
        if r.kind == "linear":
            assert cp.get_submodule(r.module) is r.target
            assert model.get_submodule(r.module) is not r.target
    assert str(accel.report(cp)) == str(accel.report(model))

    a, b = (cp, model) if first == "copy" else (model, cp)
    accel.unpatch(a)
    assert not accel.is_patched(a) and accel.is_patched(b)
    assert a.config._attn_implementation == "sdpa" and b.config._attn_implementation == impl
    assert torch.equal(logits(a, x), dense)
    assert torch.equal(logits(b, x), patched)
    assert module_types(a) == module_types(fresh)
    accel.unpatch(b)
    assert not accel.is_patched(b)
    assert torch.equal(logits(b, x), dense)
    assert module_types(b) == module_types(fresh)
    assert torch.equal(logits(fresh, x), dense)
    # Nothing of the patch is left on either attention module.
    for m in (model, cp):
        assert all("_accel_attention" not in l.self_attn.__dict__ for l in m.model.layers)
        assert all(not l.self_attn._forward_pre_hooks for l in m.model.layers)


def test_deepcopy_of_offloaded_ds_model(tmp_path):
    model = accel.models.tiny("llama")
    ids = tokens(T=40)
    art = ds_art(model, budget=12, offload="disk", offload_dir=str(tmp_path), offload_select="predicted")

    def gen(m):
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
        return out

    ref = gen(model)
    accel.patch(model, art)
    want = gen(model)
    cp = copy.deepcopy(model)
    got = gen(cp)
    assert torch.equal(got, want)
    # The copy's offload accounting is its own: the original's report object is not shared.
    assert cp.__dict__["_accel_offload_report"] is not model.__dict__["_accel_offload_report"]
    accel.unpatch(cp)
    assert torch.equal(gen(cp), ref)
    assert accel.is_patched(model) and torch.equal(gen(model), want)
    accel.unpatch(model)
    assert torch.equal(gen(model), ref)


# ---- stacking -----------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", ["prune", "gqsa", "rsparse"])
@pytest.mark.parametrize("order", ["ds-first", "weight-first"])
def test_attention_method_composes_with_one_weight_method(weight, order):
    model = accel.models.tiny("qwen3")
    x = tokens()
    dense = logits(model, x)
    ds, w = ds_art(model), build(weight, model)
    # The composition computes what one artifact holding both methods computes.
    both = Artifact.for_model(model, ds.configs + w.configs, {**ds.tensors, **w.tensors})
    with accel.patched(model, both):
        want = logits(model, x)
    for art in ((ds, w) if order == "ds-first" else (w, ds)):
        accel.patch(model, art)
    assert accel.report(model).by_method().keys() >= {"double-sparsity", weight}
    assert torch.equal(logits(model, x), want)
    assert not torch.equal(want, dense)
    accel.unpatch(model)
    assert torch.equal(logits(model, x), dense)


def test_patched_context_on_a_patched_model_undoes_only_its_own_patch():
    model = accel.models.tiny("llama")
    x = tokens()
    dense = logits(model, x)
    accel.patch(model, prune_art(model))
    pruned = logits(model, x)
    rows = len(accel.report(model))
    with accel.patched(model, ds_art(model)):
        assert accel.report(model).by_method().keys() == {"prune", "double-sparsity"}
    assert accel.is_patched(model) and len(accel.report(model)) == rows
    assert torch.equal(logits(model, x), pruned)
    accel.unpatch(model)
    assert torch.equal(logits(model, x), dense)


def test_patch_docstring_states_the_stacking_rules():
    doc = accel.patch.__doc__
    assert "stack" in doc.lower() and "PatchConflictError" in doc and "offload" in doc


def test_weight_method_selecting_no_linear_is_refused():
    model = accel.models.tiny("llama")
    art = gqsa_art(model)
    art.configs[0] = GQSAConfig(bits=4, sparsity=0.5, group_size=16, ignore=["re:.*"])
    with pytest.raises(accel.TargetError, match="no linear"):
        accel.patch(model, art)
    assert not accel.is_patched(model)
    assert all(isinstance(m, nn.Linear) for _, m in iter_linears(model))
