"""Bad input to accel.patch: each case raises the exact accel error class with a message naming the
problem, and leaves the model exactly as it was (same logits, same modules, same patch state)."""
import copy
import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import accel
from accel.artifact import Artifact, ArtifactError
from accel.configs import ConfigError, MethodConfig
from accel.configs.gqsa import GQSAConfig
from accel.configs.prune import PruneConfig
from accel.patches import PatchConflictError, TargetError, UnsupportedModelError
from accel.patches.core import state_of
from accel.patches.prune import pack_mask

from test_patch_state import ds_art, ds_order, gqsa_art, prune_art, rsparse_art

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("ACCEL_KERNEL", "reference")


@dataclass
class _NoRuntimeConfig(MethodConfig):  # a config class with no applier (and not in the registry)
    method: ClassVar[str] = "no-runtime"


def _saved(art, tmp_path, edit=None):
    path = art.save(tmp_path / "art")
    if edit is not None:
        doc = json.loads((path / "accel_config.json").read_text())
        edit(doc)
        (path / "accel_config.json").write_text(json.dumps(doc))
    return str(path)


def _with(art, **changes):
    """`art` with some tensors replaced (value None: removed)."""
    t = dict(art.tensors)
    for k, v in changes.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    return Artifact(configs=list(art.configs), tensors=t, fingerprint=art.fingerprint)


def _order_with(m, fn):
    o = ds_order(m)
    fn(o)
    return o


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)).eval()


def _bert():
    from transformers import BertConfig, BertForMaskedLM
    return BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=64, max_position_embeddings=32)).eval()


def _two_methods(m):
    p, g = prune_art(m), gqsa_art(m)
    return Artifact.for_model(m, p.configs + g.configs, {**p.tensors, **g.tensors})


G = "gqsa/" + Q
R = "rsparse/" + Q
# id: (model factory or None for tiny llama, pre-patch (model -> spec) or None,
#      failing spec (model, tmp_path) -> spec, patch kwargs, error class, message regex)
CASES = {
    "unsupported-gpt2": (_gpt2, None, lambda m, d: accel.IdentityConfig(), {}, UnsupportedModelError, "gpt2"),
    "unsupported-bert": (_bert, None, lambda m, d: accel.IdentityConfig(), {}, UnsupportedModelError, "bert"),
    "unsupported-no-config": (lambda: nn.Sequential(nn.Linear(4, 4)), None, lambda m, d: accel.IdentityConfig(), {},
                              UnsupportedModelError, "Sequential"),
    "empty-methods-in-memory": (None, None, lambda m, d: Artifact.for_model(m, []), {}, ArtifactError,
                                "has no methods"),
    # (Artifact.save refuses an empty list: write one, then empty it by hand.)
    "empty-methods-on-disk": (None, None, lambda m, d: _saved(prune_art(m), d, lambda doc: doc.update(methods=[])),
                              {}, ArtifactError, r"art.*methods"),
    "methods-key-missing": (None, None, lambda m, d: _saved(prune_art(m), d, lambda doc: doc.pop("methods")), {},
                            ArtifactError, "methods"),
    "empty-config-list": (None, None, lambda m, d: [], {}, ConfigError, "empty list"),
    "unknown-method-in-json": (None, None, lambda m, d: _saved(
        prune_art(m), d, lambda doc: doc["methods"][0].update(method="no-such-method")), {}, ArtifactError,
        "no-such-method"),
    "method-without-runtime": (None, None, lambda m, d: _NoRuntimeConfig(), {}, ArtifactError,
                               "'no-runtime' has no runtime"),
    "wrong-spec-type-int": (None, None, lambda m, d: 42, {}, TypeError, "expects an Artifact.*int"),
    "wrong-spec-type-dict": (None, None, lambda m, d: {"method": "prune"}, {}, TypeError, "expects an Artifact.*dict"),
    "fingerprint-mismatch": (None, None, lambda m, d: prune_art(accel.models.tiny("mistral")), {}, ArtifactError,
                             "different model"),
    "stack-prune-then-gqsa": (None, prune_art, lambda m, d: gqsa_art(m), {}, PatchConflictError,
                              rf"gqsa .* on prune .* at {Q}"),
    "stack-gqsa-then-prune": (None, gqsa_art, lambda m, d: prune_art(m), {}, PatchConflictError,
                              rf"prune .* on gqsa .* at {Q}"),
    "stack-prune-then-rsparse": (None, prune_art, lambda m, d: rsparse_art(m), {}, PatchConflictError,
                                 rf"rsparse .* on prune .* at {Q}"),
    "stack-rsparse-then-gqsa": (None, rsparse_art, lambda m, d: gqsa_art(m), {}, PatchConflictError,
                                rf"gqsa .* on rsparse .* at {Q}"),
    "stack-identity-then-prune": (None, lambda m: accel.IdentityConfig(), lambda m, d: prune_art(m), {},
                                  PatchConflictError, "prune .* on identity"),
    "stack-ds-then-identity": (None, ds_art, lambda m, d: accel.IdentityConfig(), {}, PatchConflictError,
                               r"identity .* on double-sparsity .* at model\.layers\.0\.self_attn"),
    "stack-ds-then-ds": (None, ds_art, lambda m, d: ds_art(m, budget=4), {}, PatchConflictError,
                         "double-sparsity .* on double-sparsity .* attention"),
    "one-artifact-two-weight-methods": (None, None, lambda m, d: _two_methods(m), {}, PatchConflictError,
                                        rf"gqsa .* on prune .* at {Q}"),
    "double-patch-same-artifact": (None, prune_art, lambda m, d: prune_art(m), {}, PatchConflictError,
                                   rf"{Q} is already patched by prune from the same"),
    "double-patch-same-config": (None, lambda m: accel.IdentityConfig(), lambda m, d: accel.IdentityConfig(), {},
                                 PatchConflictError, "already patched by identity"),
    "ds-channel-too-large": (None, None, lambda m, d: ds_art(m, order=_order_with(m, lambda o: o[2, 1, 0].fill_(16))),
                             {}, ArtifactError, r"order_qk.*layer 2.*kv head 1.*16.*\[0, 16\)"),
    "ds-channel-negative": (None, None, lambda m, d: ds_art(m, order=_order_with(m, lambda o: o[3, 0, 2].fill_(-1))),
                            {}, ArtifactError, r"order_qk.*layer 3.*kv head 0.*-1"),
    "ds-order-float": (None, None, lambda m, d: ds_art(m, order=ds_order(m).float()), {}, ArtifactError,
                       "order_qk.*float32.*integer"),
    "ds-wrong-layers": (None, None, lambda m, d: ds_art(m, order=ds_order(m)[:3]), {}, ArtifactError,
                        "order_qk.*layers=4"),
    "ds-wrong-heads": (None, None, lambda m, d: ds_art(m, order=ds_order(m)[:, :1]), {}, ArtifactError,
                       "order_qk.*kv_heads=2"),
    "ds-repeated-channel": (None, None, lambda m, d: ds_art(
        m, order=_order_with(m, lambda o: o[1, 1, 1].copy_(o[1, 1, 0]))), {}, ArtifactError,
        r"order_qk.*layer 1.*kv head 1.*repeats"),
    "ds-order-missing": (None, None, lambda m, d: _with(ds_art(m), **{"double-sparsity/order_qk": None}), {},
                         ArtifactError, "no channel order 'order_qk'"),
    "prune-mask-wrong-shape": (None, None, lambda m, d: _with(prune_art(m), **{
        "prune/" + Q: pack_mask(torch.ones(64, 65, dtype=torch.bool))}), {}, ArtifactError, rf"{Q}.*does not fit"),
    "prune-mask-wrong-dtype": (None, None, lambda m, d: _with(prune_art(m), **{
        "prune/" + Q: torch.ones(64 * 64 // 8, dtype=torch.int32)}), {}, ArtifactError, rf"{Q}.*int32"),
    "prune-mask-missing": (None, None, lambda m, d: _with(prune_art(m), **{"prune/" + Q: None}), {}, ArtifactError,
                           f"no mask .*{Q}"),
    "prune-targets-match-nothing": (None, None, lambda m, d: PruneConfig(targets=["no_such_proj"]), {}, TargetError,
                                    "no_such_proj"),
    "gqsa-qweight-missing": (None, None, lambda m, d: _with(gqsa_art(m), **{G + ".qweight": None}), {},
                             ArtifactError, rf"{Q}.*incomplete"),
    "gqsa-meta-too-short": (None, None, lambda m, d: _with(gqsa_art(m), **{G + ".meta": torch.tensor([64, 16, 4])}),
                            {}, ArtifactError, rf"{Q}.*malformed"),
    "gqsa-meta-2d": (None, None, lambda m, d: _with(gqsa_art(m), **{G + ".meta": torch.tensor([[64, 16], [4, 1]])}),
                     {}, ArtifactError, rf"{Q}.*malformed"),
    "gqsa-scales-wrong-shape": (None, None, lambda m, d: _with(gqsa_art(m), **{
        G + ".scales": torch.ones(3, 2)}), {}, ArtifactError, rf"gqsa.*{Q}"),
    "gqsa-tensors-for-missing-linear": (None, None, lambda m, d: _with(gqsa_art(m), **{
        "gqsa/model.layers.9.mlp.up_proj.meta": torch.tensor([64, 16, 4, 1])}), {}, ArtifactError,
        "model.layers.9.mlp.up_proj"),
    "gqsa-ignores-every-linear": (None, None, lambda m, d: Artifact.for_model(
        m, [GQSAConfig(bits=4, sparsity=0.5, group_size=16, ignore=["re:.*"])], gqsa_art(m).tensors), {}, TargetError,
        "select no linear"),
    "rsparse-s_rho-missing": (None, None, lambda m, d: _with(rsparse_art(m), **{R + ".s_rho": None}), {},
                              ArtifactError, rf"{Q}.*s_rho"),
    "rsparse-threshold-nan": (None, None, lambda m, d: _with(rsparse_art(m), **{R + ".threshold": torch.tensor(math.nan)}),
                              {}, ArtifactError, rf"{Q}.*threshold"),
    "rsparse-down-without-up": (None, None, lambda m, d: _with(rsparse_art(m), **{R + ".down": torch.ones(2, 64)}),
                                {}, ArtifactError, rf"{Q}.*up"),
    "offload-without-ds": (None, None, lambda m, d: prune_art(m), {"offload": "disk"}, ConfigError,
                           "offload.*double-sparsity"),
    "offload-bad-kind": (None, None, lambda m, d: ds_art(m), {"offload": "tape"}, ConfigError, "offload must be"),
}


def _out(model):
    with torch.no_grad():
        if not hasattr(model, "config"):
            return model(torch.ones(2, 4))
        ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(42))
        return model(input_ids=ids).logits


def _snapshot(model):
    st = state_of(model)
    rows = None if st is None else [(r.module, r.method, r.kind, r.detail) for r in st.rows]
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return _out(model), accel.is_patched(model), rows, {n: m for n, m in model.named_modules()}, attn


@pytest.mark.parametrize("case", list(CASES))
def test_bad_patch_input_is_refused_and_model_unchanged(case, tmp_path):
    make, pre, bad, kwargs, err, match = CASES[case]
    model = make() if make is not None else accel.models.tiny("llama")
    if pre is not None:
        accel.patch(model, pre(model))
    spec = bad(model, tmp_path)
    out0, patched0, rows0, mods0, attn0 = _snapshot(model)
    with pytest.raises(err, match=match) as e:
        accel.patch(model, spec, **kwargs)
    assert type(e.value) is err, f"{type(e.value).__name__}: {e.value}"
    assert err is TypeError or isinstance(e.value, accel.AccelError)  # a wrong-typed argument stays a TypeError
    out1, patched1, rows1, mods1, attn1 = _snapshot(model)
    assert torch.equal(out0, out1)
    assert (patched1, rows1, attn1) == (patched0, rows0, attn0)
    assert mods1.keys() == mods0.keys() and all(mods1[n] is mods0[n] for n in mods0)


def test_unpatch_of_unpatched_model_is_a_no_op():
    model = accel.models.tiny("llama")
    out0, _, _, mods0, attn0 = _snapshot(model)
    assert accel.unpatch(model) is model and accel.unpatch(model) is model
    out1, patched, rows, mods1, attn1 = _snapshot(model)
    assert torch.equal(out0, out1) and not patched and rows is None and attn1 == attn0
    assert all(mods1[n] is mods0[n] for n in mods0)


def test_unpatch_twice_after_patch():
    model = accel.models.tiny("llama")
    out0 = _out(model)
    accel.patch(model, prune_art(model))
    accel.unpatch(model)
    accel.unpatch(model)
    assert not accel.is_patched(model) and torch.equal(_out(model), out0)


def test_failed_stack_on_a_deep_copy_leaves_both_models():
    model = accel.models.tiny("llama")
    accel.patch(model, prune_art(model))
    cp = copy.deepcopy(model)
    out = _out(model)
    with pytest.raises(PatchConflictError, match="gqsa .* on prune"):
        accel.patch(cp, gqsa_art(cp))
    assert torch.equal(_out(cp), out) and torch.equal(_out(model), out)
    accel.unpatch(cp)
    assert accel.is_patched(model) and torch.equal(_out(model), out)
