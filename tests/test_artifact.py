"""Artifact save/load round trip and the errors for wrong, corrupt and truncated artifacts."""
import json

import pytest
import torch

import accel
from accel.artifact import CONFIG_NAME, TENSORS_NAME, Artifact, ArtifactError, fingerprint
from accel.configs import ConfigError, IdentityConfig, config_from_dict


def _artifact(model):
    g = torch.Generator().manual_seed(42)
    tensors = {"identity/a": torch.randn(7, 5, generator=g), "identity/b": torch.arange(10, dtype=torch.int32),
               "identity/c": torch.randint(0, 2, (3, 8), generator=g, dtype=torch.uint8)}
    return Artifact.for_model(model, IdentityConfig(attention=False), tensors,
                              calibration={"source": "wiki", "n_samples": 4})


def test_round_trip(tmp_path):
    model = accel.models.tiny("llama")
    art = _artifact(model)
    art.save(tmp_path / "art")
    back = Artifact.load(tmp_path / "art")
    assert [c.to_dict() for c in back.configs] == [c.to_dict() for c in art.configs]
    assert back.tensors.keys() == art.tensors.keys()
    for k in art.tensors:
        assert torch.equal(back.tensors[k], art.tensors[k]) and back.tensors[k].dtype == art.tensors[k].dtype
    assert back.fingerprint == fingerprint(model)
    assert back.calibration == {"source": "wiki", "n_samples": 4}
    assert set(back.versions) >= {"accel", "torch", "transformers"}
    assert back.tensors_for("identity").keys() == {"a", "b", "c"}
    doc = json.loads((tmp_path / "art" / CONFIG_NAME).read_text())
    assert doc["format_version"] == 1 and doc["methods"][0]["method"] == "identity"
    # The artifact patches its own model, and leaves no temp dirs behind.
    accel.patch(model, tmp_path / "art")
    assert accel.is_patched(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_save_overwrites_atomically(tmp_path):
    model = accel.models.tiny("llama")
    _artifact(model).save(tmp_path / "art")
    art2 = Artifact.for_model(model, IdentityConfig(), {"identity/z": torch.ones(2)})
    with pytest.raises(ArtifactError, match="overwrite"):
        art2.save(tmp_path / "art")  # replacing an artifact needs overwrite=True
    assert Artifact.load(tmp_path / "art").tensors.keys() == {"identity/a", "identity/b", "identity/c"}
    art2.save(tmp_path / "art", overwrite=True)
    assert Artifact.load(tmp_path / "art").tensors.keys() == {"identity/z"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_save_into_empty_dir(tmp_path):
    (tmp_path / "art").mkdir()
    _artifact(accel.models.tiny("llama")).save(tmp_path / "art")
    assert Artifact.load(tmp_path / "art").tensors.keys() == {"identity/a", "identity/b", "identity/c"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                      (0o002, 0o775, 0o664)], ids=["022", "077", "002"])
def test_saved_modes_follow_umask(tmp_path, umask, dir_mode, file_mode):
    import os
    import stat

    old = os.umask(umask)
    try:
        _artifact(accel.models.tiny("llama")).save(tmp_path / "art")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "art").stat().st_mode) == dir_mode
    for name in (CONFIG_NAME, TENSORS_NAME):
        assert stat.S_IMODE((tmp_path / "art" / name).stat().st_mode) == file_mode, name


def test_wrong_model_is_named(tmp_path):
    _artifact(accel.models.tiny("llama")).save(tmp_path / "art")
    with pytest.raises(ArtifactError, match="different model") as e:
        accel.patch(accel.models.tiny("qwen2"), tmp_path / "art")
    assert "model_type" in str(e.value) and "qwen2" in str(e.value)
    # Same architecture, other weights: the weight hash tells them apart.
    with pytest.raises(ArtifactError, match="weights_sha256"):
        accel.patch(accel.models.tiny("llama", seed=1), tmp_path / "art")


def test_fingerprint_is_dtype_independent():
    assert fingerprint(accel.models.tiny("llama")) == fingerprint(accel.models.tiny("llama").to(torch.bfloat16))


def test_truncated_safetensors(tmp_path):
    _artifact(accel.models.tiny("llama")).save(tmp_path / "art")
    f = tmp_path / "art" / TENSORS_NAME
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(ArtifactError, match="truncated"):
        Artifact.load(tmp_path / "art")


def test_corrupt_safetensors_same_size(tmp_path):
    _artifact(accel.models.tiny("llama")).save(tmp_path / "art")
    f = tmp_path / "art" / TENSORS_NAME
    b = bytearray(f.read_bytes())
    b[-5] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(ArtifactError, match="corrupt"):
        Artifact.load(tmp_path / "art")


def test_corrupt_json_missing_dir_and_unknown_version(tmp_path):
    with pytest.raises(ArtifactError, match="missing"):
        Artifact.load(tmp_path / "nope")
    _artifact(accel.models.tiny("llama")).save(tmp_path / "art")
    cfg = tmp_path / "art" / CONFIG_NAME
    text = cfg.read_text()
    cfg.write_text(text[:50])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Artifact.load(tmp_path / "art")
    doc = json.loads(text)
    doc["format_version"] = 99
    cfg.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="format version 99"):
        Artifact.load(tmp_path / "art")
    doc["format_version"] = 1
    doc["methods"][0]["version"] = 7
    cfg.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="version 7"):
        Artifact.load(tmp_path / "art")
    doc["methods"][0] = {"method": "nonsense", "version": 1, "params": {}}
    cfg.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="unknown method 'nonsense'"):
        Artifact.load(tmp_path / "art")


def test_artifact_refuses_path_traversal(tmp_path):
    _artifact(accel.models.tiny("llama")).save(tmp_path / "art")
    cfg = tmp_path / "art" / CONFIG_NAME
    doc = json.loads(cfg.read_text())
    doc["files"] = {"../evil.safetensors": {"bytes": 1, "sha256": "0" * 64}}
    cfg.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="unexpected file"):
        Artifact.load(tmp_path / "art")


def test_config_unknown_field():
    with pytest.raises(ConfigError, match="unknown config field"):
        config_from_dict({"method": "identity", "version": 1, "params": {"bogus": 1}})
