"""Bad accel checkpoints fail clearly; saving never writes a checkpoint that loads wrong; output
rules; without accel, transformers names the unknown quantization method."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _hf_ckpt import BUILDERS
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import accel
from accel import ArtifactError
from accel.configs import base as cfg_base
from accel.patches import core

ROOT = Path(__file__).resolve().parent.parent


def _saved(tmp_path, method="gqsa", arch="llama"):
    model = accel.models.tiny(arch)
    accel.patch(model, BUILDERS[method](model))
    return accel.save_pretrained(model, tmp_path / "ck")


def _edit_config(ck, fn):
    p = ck / "config.json"
    doc = json.loads(p.read_text())
    fn(doc["quantization_config"])
    p.write_text(json.dumps(doc))


def _edit_tensors(ck, fn):
    p = ck / "model.safetensors"
    t = load_file(str(p))
    fn(t)
    save_file(t, str(p), metadata={"format": "pt"})


def test_unknown_format_version_names_both_versions(tmp_path):
    ck = _saved(tmp_path)
    _edit_config(ck, lambda q: q.update(format_version=7))
    with pytest.raises(ArtifactError, match=r"format version 7 is not supported.*version\(s\) 1"):
        AutoModelForCausalLM.from_pretrained(ck)


def test_older_method_config_versions_load(tmp_path):
    """A method config of an older version is upgraded as in an artifact (GQSA v1: rtn + uniform)."""
    ck = _saved(tmp_path)

    def to_v1(q):
        m = q["methods"][0]
        m["version"] = 1
        for k in ("init", "allocation"):
            m["params"].pop(k)
    _edit_config(ck, to_v1)
    cfg = core.state_of(AutoModelForCausalLM.from_pretrained(ck)).methods[0]
    assert (cfg.init, cfg.allocation) == ("rtn", "uniform")


def test_missing_tensor_names_the_module(tmp_path):
    ck = _saved(tmp_path)
    _edit_tensors(ck, lambda t: t.pop("model.layers.2.mlp.up_proj.scales"))
    with pytest.raises(ArtifactError, match=r"model\.layers\.2\.mlp\.up_proj.*no scales"):
        AutoModelForCausalLM.from_pretrained(ck)


def test_wrong_shape_names_the_module(tmp_path):
    ck = _saved(tmp_path)
    name = "model.layers.1.self_attn.o_proj"

    def cut(t):
        for leaf in ("qweight", "colmask", "scales", "zeros"):
            t[f"{name}.{leaf}"] = t[f"{name}.{leaf}"][:-1].clone()
    _edit_tensors(ck, cut)
    with pytest.raises(ArtifactError, match=rf"{name}"):
        AutoModelForCausalLM.from_pretrained(ck)


def test_tensors_for_a_linear_the_config_does_not_target(tmp_path):
    ck = _saved(tmp_path)
    _edit_config(ck, lambda q: q["methods"][0]["params"].update(targets=["q_proj"]))
    with pytest.raises(ArtifactError, match=r"model\.layers\.\d\.\w+\.(k|v|o|gate|up|down)_proj: the checkpoint stores .*no method"):
        AutoModelForCausalLM.from_pretrained(ck)


def test_bad_rsparse_threshold_names_the_module(tmp_path):
    ck = _saved(tmp_path, "rsparse")
    _edit_tensors(ck, lambda t: t.update({"model.layers.3.mlp.gate_proj.threshold": torch.tensor([-1.0])}))
    with pytest.raises(ArtifactError, match=r"model\.layers\.3\.mlp\.gate_proj\.threshold"):
        AutoModelForCausalLM.from_pretrained(ck)


def test_bad_ds_channels_name_the_tensor(tmp_path):
    ck = _saved(tmp_path, "double-sparsity")
    _edit_tensors(ck, lambda t: t["accel.double-sparsity.order_qk"].fill_(99))
    with pytest.raises(ArtifactError, match=r"order_qk.*outside"):
        AutoModelForCausalLM.from_pretrained(ck)


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    """A checkpoint whose weights are a pickle (.bin) is refused before anything is read."""
    ck = _saved(tmp_path)
    t = load_file(str(ck / "model.safetensors"))
    (ck / "model.safetensors").unlink()
    torch.save(t, ck / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(ArtifactError, match=r"pytorch_model\.bin is not a safetensors file"):
        AutoModelForCausalLM.from_pretrained(ck)


NAME = "keep-last"


@pytest.fixture
def toy():
    from accel.calibrate import registry as cal_registry

    def forget():
        accel.methods._METHODS.pop(NAME, None)
        cfg_base._REGISTRY.pop(NAME, None)
        core._APPLIERS.pop(NAME, None)
        core._CLAIMS.pop(NAME, None)
        cal_registry._REGISTRY.pop(NAME, None)
        for m in [m for m in sys.modules if m == "toy_keep_last" or m.startswith("toy_keep_last.")]:
            del sys.modules[m]
    forget()
    import toy_keep_last  # noqa: F401
    try:
        yield
    finally:
        forget()


def test_a_method_without_checkpoint_format_is_refused_by_name(toy, tmp_path):
    """Until a method can be saved, both save paths raise naming it, and write nothing."""
    model = accel.models.tiny("llama")
    accel.patch(model, BUILDERS["gqsa"](model))
    accel.patch(model, accel.configs.get_config_class(NAME)(n=16))
    with pytest.raises(ArtifactError, match=r"method 'keep-last' has no checkpoint format"):
        accel.save_pretrained(model, tmp_path / "a")
    with pytest.raises(ArtifactError, match=r"method 'keep-last' has no checkpoint format"):
        model.save_pretrained(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) in ([], ["b"])
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_output_rules(tmp_path):
    model = accel.models.tiny("llama")
    accel.patch(model, BUILDERS["prune"](model))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an accel hf export"):
        accel.save_pretrained(model, mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    ck = accel.save_pretrained(model, tmp_path / "ck")
    before = {p.name: p.stat().st_mtime_ns for p in ck.iterdir()}
    with pytest.raises(ArtifactError, match="--overwrite"):
        accel.save_pretrained(model, ck)
    assert {p.name: p.stat().st_mtime_ns for p in ck.iterdir()} == before
    accel.save_pretrained(model, ck, overwrite=True)
    assert {"config.json", "model.safetensors", "README.md", "accel_export.json"} <= {p.name for p in ck.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "mine"]  # no temp dir left


def test_unpatched_model_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="not patched by accel"):
        accel.save_pretrained(accel.models.tiny("llama"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


_PLAIN = """
import sys
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert "accel" not in sys.modules
print("LOADED")
"""


WITHOUT_ACCEL = sorted(BUILDERS) + ["gqsa-embedding", "double-sparsity+gqsa", "double-sparsity+prune"]


@pytest.mark.parametrize("case", WITHOUT_ACCEL)
def test_without_accel_loading_fails_naming_accel(tmp_path, case):
    """In a process that never imports accel: transformers names quant_method "accel" (and skips
    it), then stops on the empty `weight` accel stores where a patched module's dense weight was
    (GQSA: no dense weight at all; the others keep it under `accel_weight`; Double Sparsity: its
    q/k projections'). Before, prune / R-Sparse / DS / identity checkpoints loaded as a plain
    model without the method."""
    from _hf_ckpt import build

    model = accel.models.tiny("llama")
    accel.patch(model, build(model, case))
    ck = accel.save_pretrained(model, tmp_path / "ck")
    r = subprocess.run([sys.executable, "-c", _PLAIN, str(ck)], capture_output=True, text=True, cwd=tmp_path,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    out = r.stdout + r.stderr
    assert "Unknown quantization type, got accel" in out
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "mismatch" in out.lower() and "accel" in out


@pytest.mark.parametrize("case", ["gqsa", "gqsa-embedding", "prune"])
def test_fingerprint_mismatch_is_refused(tmp_path, case):
    """The fingerprint is checked after the patch (GQSA's stand-in linears keep a meta weight, so
    checking before skipped it for every GQSA checkpoint); a packed embedding's hash comes from
    its `fingerprint_rows`."""
    from _hf_ckpt import build

    model = accel.models.tiny("llama")
    accel.patch(model, build(model, case))
    ck = accel.save_pretrained(model, tmp_path / "ck")
    AutoModelForCausalLM.from_pretrained(ck)  # the untouched checkpoint loads
    saved = json.loads((ck / "config.json").read_text())["quantization_config"]["fingerprint"]["weights_sha256"]
    _edit_config(ck, lambda q: q["fingerprint"].update(weights_sha256="0" * 16))
    # The loaded, patched model hashes as the base model did when saved.
    with pytest.raises(ArtifactError, match=rf"(?s)different model.*weights_sha256: checkpoint has "
                                            rf"'0{{16}}', model has '{saved}'"):
        AutoModelForCausalLM.from_pretrained(ck)


def test_missing_fingerprint_is_refused(tmp_path):
    ck = _saved(tmp_path)
    _edit_config(ck, lambda q: q.pop("fingerprint"))
    with pytest.raises(ArtifactError, match=r"quantization_config has no fingerprint"):
        AutoModelForCausalLM.from_pretrained(ck)


def test_global_tensor_of_a_method_missing_from_the_config(tmp_path):
    """A checkpoint whose config lost its Double Sparsity entry must not load dense silently."""
    from _hf_ckpt import build

    model = accel.models.tiny("llama")
    accel.patch(model, build(model, "double-sparsity+gqsa"))
    ck = accel.save_pretrained(model, tmp_path / "ck")
    _edit_config(ck, lambda q: q.update(methods=[m for m in q["methods"] if m["method"] != "double-sparsity"]))
    with pytest.raises(ArtifactError, match=r"accel\.double-sparsity\.order_qk.*'double-sparsity'.*not in"):
        AutoModelForCausalLM.from_pretrained(ck)
