"""Loading options (dtype=, device_map=), pipeline(), copies of a loaded model, the model card, and
`accel export --format hf` for every method and for one artifact of several methods."""
import copy
import json

import pytest
import torch
from _hf_ckpt import BUILDERS, merged
from transformers import AutoModelForCausalLM

import accel
from accel.cli import main
from accel.patches.gqsa import GQSALinear

IDS = torch.randint(1, 500, (1, 24), generator=torch.Generator().manual_seed(42))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


_DENSE = {}


def _bf16_llama(tmp_path_factory):
    """tiny-llama in bf16 as from_pretrained makes it (`model.to(bf16)` would also cast the fp32
    rotary buffer, so its logits differ from any loaded bf16 model's)."""
    if "dir" not in _DENSE:
        _DENSE["dir"] = tmp_path_factory.mktemp("dense") / "llama"
        accel.models.tiny("llama").save_pretrained(_DENSE["dir"])
    return AutoModelForCausalLM.from_pretrained(_DENSE["dir"], dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def gqsa_ck(tmp_path_factory):
    """A bf16 GQSA checkpoint and the patched bf16 model's logits."""
    model = _bf16_llama(tmp_path_factory)
    accel.patch(model, BUILDERS["gqsa"](model))
    ck = accel.save_pretrained(model, tmp_path_factory.mktemp("g") / "ck", metrics={"wiki ppl": 123.4})
    return ck, _logits(model), accel.report(model).rows


@pytest.mark.parametrize("device_map", [None, "cpu", "auto"])
def test_device_map(gqsa_ck, device_map):
    ck, ref, rows = gqsa_ck
    kw = {} if device_map is None else {"device_map": device_map}
    loaded = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16, **kw)
    assert torch.equal(_logits(loaded), ref)
    assert accel.report(loaded).rows == rows
    assert loaded.model.layers[0].self_attn.q_proj.qweight.device.type == "cpu"


def test_dtype_is_honoured(gqsa_ck):
    """dtype=float32: dense weights and GQSA biases/activations in fp32; the packed format unchanged."""
    ck, _, _ = gqsa_ck
    loaded = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, GQSALinear) and q.act_dtype == torch.float32
    assert q.qweight.dtype == torch.uint8 and q.scales.dtype == torch.float16
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    assert torch.isfinite(_logits(loaded)).all()


def test_pipeline_generates(gqsa_ck):
    from transformers import pipeline

    ck, _, _ = gqsa_ck
    pipe = pipeline("text-generation", model=str(ck), tokenizer=_tokenizer(), dtype=torch.bfloat16)
    assert isinstance(pipe.model.model.layers[0].mlp.up_proj, GQSALinear)
    out = pipe("hello", max_new_tokens=4, do_sample=False)
    assert isinstance(out[0]["generated_text"], str)


def _tokenizer():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(500)} | {"hello": 500, "[UNK]": 501},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="w0", pad_token="w0")


def test_deepcopy_of_a_loaded_model(gqsa_ck):
    ck, ref, _ = gqsa_ck
    loaded = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16)
    twin = copy.deepcopy(loaded)
    accel.unpatch(twin)  # keeps the checkpoint's methods
    assert torch.equal(_logits(twin), ref) and torch.equal(_logits(loaded), ref)


def test_model_card(gqsa_ck):
    ck, _, _ = gqsa_ck
    card = (ck / "README.md").read_text()
    assert "gqsa" in card and "bits=4" in card and "group_size=16" in card and "wiki ppl: 123.4" in card
    assert "import accel" in card


def _cli_export(tmp_path, art, name):
    art_dir = art.save(tmp_path / f"{name}_art")
    out = tmp_path / f"{name}_hf"
    assert main(["export", "--format", "hf", str(art_dir), "--output", str(out), "--model", "tiny-llama"]) == 0
    return out


@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_cli_export_hf_every_method(tmp_path, tmp_path_factory, method):
    """`accel export --format hf` = the bf16 base model patched with the artifact, saved."""
    model = accel.models.tiny("llama")
    art = BUILDERS[method](model)
    out = _cli_export(tmp_path, art, method)
    ref = _bf16_llama(tmp_path_factory)
    accel.patch(ref, art)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.equal(_logits(loaded), _logits(ref))
    assert accel.report(loaded).rows == accel.report(ref).rows
    assert json.loads((out / "config.json").read_text())["quantization_config"]["methods"][0]["method"] == method


def test_cli_export_hf_artifact_of_several_methods(tmp_path, tmp_path_factory):
    """An artifact holding double-sparsity + prune (what a recipe makes) exports as one checkpoint."""
    model = accel.models.tiny("llama")
    art = merged(BUILDERS["double-sparsity"](model), BUILDERS["prune"](model))
    out = _cli_export(tmp_path, art, "multi")
    ref = _bf16_llama(tmp_path_factory)
    accel.patch(ref, art)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.equal(_logits(loaded), _logits(ref))
    assert {r["method"] for r in accel.report(loaded).rows} == {"double-sparsity", "prune"}


def test_cli_export_hf_dense_is_the_plain_pruned_model(tmp_path):
    """--format hf-dense: the old export, dense weights with zeros, no quantization_config."""
    model = accel.models.tiny("llama")
    art = BUILDERS["prune"](model)
    art.calibration["model"] = "tiny-llama"
    art_dir = art.save(tmp_path / "art")
    assert main(["export", "--format", "hf-dense", str(art_dir), "--output", str(tmp_path / "dense")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    accel.patch(model, art)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not accel.is_patched(plain)
    assert torch.equal(_logits(plain), _logits(model))
