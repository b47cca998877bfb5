"""accel checkpoints through transformers: `accel.save_pretrained` / `model.save_pretrained` on a
patched model, then plain `AutoModelForCausalLM.from_pretrained` (after `import accel`) gives
the patched model back: logits bit-exact on CPU fp32 (prefill and greedy decode through the
cache), the same `accel.report` rows (module, method, kernel path, detail)."""
import json

import pytest
import torch
from _hf_ckpt import BUILDERS, merged
from transformers import AutoModelForCausalLM

import accel
from accel.models import TINY_ARCHS
from accel.patches import compat


def _run(model, ids):
    """Prefill logits + 4 greedy decode steps' logits (Double Sparsity selects tokens at decode)."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        res, cache, nxt = [out.logits], compat.output_cache(out), out.logits[:, -1:].argmax(-1)
        for _ in range(4):
            out = model(input_ids=nxt, use_cache=True, **compat.cache_kwargs(cache))
            res.append(out.logits)
            cache, nxt = compat.output_cache(out), out.logits[:, -1:].argmax(-1)
    return res


IDS = torch.randint(1, 500, (2, 40), generator=torch.Generator().manual_seed(42))


def _round_trip(arch, art_of, tmp_path, via="accel"):
    model = accel.models.tiny(arch)
    art = art_of(model)
    accel.patch(model, art)
    ref, rows = _run(model, IDS), accel.report(model).rows
    out = tmp_path / "ck"
    if via == "accel":
        accel.save_pretrained(model, out)
    else:
        model.save_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    got = _run(loaded, IDS)
    for a, b in zip(ref, got):
        assert torch.equal(a, b), (a - b).abs().max()
    assert accel.report(loaded).rows == rows
    return model, loaded, out


CASES = {**{m: BUILDERS[m] for m in BUILDERS},
         "double-sparsity+gqsa": lambda m: merged(BUILDERS["double-sparsity"](m), BUILDERS["gqsa"](m))}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_each_method(arch, case, tmp_path):
    _, loaded, out = _round_trip(arch, CASES[case], tmp_path)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "accel" and qc["format_version"] == 1
    assert [m["method"] for m in qc["methods"]] == case.split("+")
    assert qc["fingerprint"]["weights_sha256"]
    assert accel.is_patched(loaded)


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a not in ("llama", "gemma3")])
def test_round_trip_composed_every_arch(arch, tmp_path):
    _round_trip(arch, CASES["double-sparsity+gqsa"], tmp_path)


def test_round_trip_rsparse_then_ds_stacked(tmp_path):
    """Two accel.patch calls (R-Sparse, then Double Sparsity) save and load as one checkpoint."""
    def stacked(m):
        accel.patch(m, BUILDERS["rsparse"](m))
        return BUILDERS["double-sparsity"](m)
    _round_trip("qwen3", stacked, tmp_path)


def test_model_save_pretrained_writes_the_accel_checkpoint(tmp_path):
    """The issue's bug: save_pretrained on a GQSA model wrote its tensors without a
    quantization_config, and from_pretrained loaded every linear randomly initialised (no error).
    Now model.save_pretrained writes the accel checkpoint and the reload is bit-exact."""
    _, _, out = _round_trip("llama", BUILDERS["gqsa"], tmp_path, via="transformers")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "accel"


def test_gqsa_checkpoint_stores_no_dense_linear_weights(tmp_path):
    """A GQSA linear is its packed tensors (+ an empty `weight` guard), never its dense weight;
    loading builds GQSALinear modules directly."""
    from safetensors import safe_open

    from accel.patches.gqsa import GQSALinear

    _, loaded, out = _round_trip("llama", BUILDERS["gqsa"], tmp_path)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    name = "model.layers.1.mlp.down_proj"
    assert {k.rpartition(".")[2] for k in shapes if k.startswith(name + ".")} == \
        {"qweight", "colmask", "scales", "zeros", "meta", "weight"}
    assert shapes[name + ".weight"] == (0,)
    assert isinstance(loaded.get_submodule(name), GQSALinear)
    assert not any(p.is_meta for p in loaded.parameters())
    assert not any(b.is_meta for b in loaded.buffers())


def test_saved_again_after_loading_and_stacking(tmp_path):
    """A loaded GQSA checkpoint takes Double Sparsity on top; unpatch removes only that; saving
    the stack writes both methods, which load back bit-exact."""
    model, loaded, _ = _round_trip("llama", BUILDERS["gqsa"], tmp_path)
    base_rows = accel.report(loaded).rows
    accel.patch(loaded, BUILDERS["double-sparsity"](model))
    ref = _run(loaded, IDS)
    accel.save_pretrained(loaded, tmp_path / "ck2")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ck2")
    assert all(torch.equal(a, b) for a, b in zip(ref, _run(again, IDS)))
    assert [c.method for c in accel.patches.core.state_of(again).methods] == ["gqsa", "double-sparsity"]
    accel.unpatch(loaded)
    assert accel.report(loaded).rows == base_rows and accel.is_patched(loaded)


def test_unpatch_restores_a_patched_model_exactly(tmp_path):
    """Patching gives the model its accel quantizer and quantization_config; unpatch removes both."""
    model = accel.models.tiny("llama")
    dense = _run(model, IDS)
    assert "hf_quantizer" not in model.__dict__ and "quantization_config" not in model.config.__dict__
    accel.patch(model, BUILDERS["gqsa"](model))
    assert model.hf_quantizer is not None and model.config.quantization_config.quant_method == "accel"
    accel.unpatch(model)
    assert "hf_quantizer" not in model.__dict__ and "quantization_config" not in model.config.__dict__
    assert all(torch.equal(a, b) for a, b in zip(dense, _run(model, IDS)))


def test_saved_config_has_no_accel_session_keys(tmp_path):
    """accel_source / accel_bos_token_id describe how this process loaded the model; written to
    config.json, a later plain from_pretrained would trust the file's claim."""
    model = accel.models.tiny("llama")
    model.config.accel_bos_token_id = 1
    accel.patch(model, BUILDERS["prune"](model))
    ck = accel.save_pretrained(model, tmp_path / "ck")
    doc = json.loads((ck / "config.json").read_text())
    assert [k for k in doc if k.startswith("accel_")] == []
    assert "accel_" not in (ck / "README.md").read_text().replace("accel_weight", "")
    # The in-memory model keeps them (calibration and perplexity read them).
    assert (model.config.accel_source, model.config.accel_bos_token_id) == ("tiny-llama", 1)
    loaded = AutoModelForCausalLM.from_pretrained(ck)
    assert not hasattr(loaded.config, "accel_source") and not hasattr(loaded.config, "accel_bos_token_id")
