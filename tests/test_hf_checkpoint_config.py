"""Plain `model.save_pretrained(dir)` on a patched model writes an accel checkpoint whose
config.json carries accel only as `quantization_config`: accel.models.load's session keys
(accel_source, accel_bos_token_id) stay in memory (calibration and perplexity read them), never
in the file, where a later load would trust them."""
import copy
import json

import torch
from _hf_ckpt import BUILDERS
from transformers import AutoModelForCausalLM

import accel


def _accel_keys(path):
    doc = json.loads((path / "config.json").read_text())
    return sorted(k for k in doc if k.startswith("accel")), doc


def test_plain_save_pretrained_of_a_patched_model_keeps_session_keys_off_config_json(tmp_path):
    model = accel.models.tiny("llama")
    model.config.accel_bos_token_id = 1
    accel.patch(model, BUILDERS["prune"](model))
    model.save_pretrained(tmp_path / "plain")
    keys, doc = _accel_keys(tmp_path / "plain")
    assert keys == [] and doc["quantization_config"]["quant_method"] == "accel", keys
    # Readers keep working: the in-memory config still has them.
    assert (model.config.accel_source, model.config.accel_bos_token_id) == ("tiny-llama", 1)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert not hasattr(loaded.config, "accel_source") and not hasattr(loaded.config, "accel_bos_token_id")
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # A deep copy saves its own config (the save wrapper follows the copy), also cleanly.
    twin = copy.deepcopy(model)
    twin.config.accel_source = "twin"
    twin.save_pretrained(tmp_path / "twin")
    assert _accel_keys(tmp_path / "twin")[0] == [] and model.config.accel_source == "tiny-llama"
    assert twin.config.accel_source == "twin"
    # Unpatched, the model is plain transformers again (its save_pretrained the class's own).
    accel.unpatch(model)
    assert "save_pretrained" not in model.__dict__
