"""Bad-input matrix for artifacts, their JSON, method configs and outputs.

Every case asserts the exact accel error class, a message naming the problem (field, file or
path), and that nothing was written: the directory tree (names, sizes, hashes, modes) is the same
before and after, with no temp leftovers.
"""
import hashlib
import json
import math
import os

import pytest
import torch

import accel
from accel.artifact import CONFIG_NAME, TENSORS_NAME, Artifact, ArtifactError
from accel.configs import ConfigError, IdentityConfig
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.configs.gqsa import GQSAConfig
from accel.configs.prune import PruneConfig
from accel.configs.rsparse import RSparseConfig

_MODEL = None


def _model():
    global _MODEL
    if _MODEL is None:
        _MODEL = accel.models.tiny("llama")
    return _MODEL


def snapshot(root):
    """Everything under root (hidden files included): path -> (kind, size, sha256, mode)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("link", os.readlink(p))
        elif p.is_dir():
            out[str(p.relative_to(root))] = ("dir", st.st_mode)
        else:
            out[str(p.relative_to(root))] = ("file", st.st_size, hashlib.sha256(p.read_bytes()).hexdigest(),
                                             st.st_mode)
    return out


def _save_identity(path):
    g = torch.Generator().manual_seed(42)
    art = Artifact.for_model(_model(), IdentityConfig(attention=False),
                             {"identity/a": torch.randn(7, 5, generator=g)}, calibration={"model": "tiny-llama"})
    return art.save(path)


@pytest.fixture
def art(tmp_path):
    return _save_identity(tmp_path / "art")


def _rewrite(path, fn):
    cfg = path / CONFIG_NAME
    doc = json.loads(cfg.read_text())
    doc = fn(doc)
    cfg.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)


# ---------------------------------------------------------------------------------------------
# Artifact files: missing, truncated, bit-flipped, wrong versions
# ---------------------------------------------------------------------------------------------
def _truncate(p, n=20):
    p.write_bytes(p.read_bytes()[:-n])


def _flip(p, at=-5):
    b = bytearray(p.read_bytes())
    b[at] ^= 0xFF
    p.write_bytes(bytes(b))


FILE_CASES = [
    ("config-missing", lambda a: (a / CONFIG_NAME).unlink(), f"{CONFIG_NAME} is missing"),
    ("config-truncated", lambda a: _truncate(a / CONFIG_NAME, 40), "not valid JSON"),
    ("config-empty", lambda a: (a / CONFIG_NAME).write_text(""), "not valid JSON"),
    ("config-binary", lambda a: (a / CONFIG_NAME).write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
    ("config-is-list", lambda a: _rewrite(a, lambda d: [d]), "not an accel artifact config"),
    ("format-wrong", lambda a: _rewrite(a, lambda d: {**d, "format": "other"}), "format='other'"),
    ("format-version-99", lambda a: _rewrite(a, lambda d: {**d, "format_version": 99}), "format version 99"),
    ("format-version-str", lambda a: _rewrite(a, lambda d: {**d, "format_version": "1"}), "format version '1'"),
    ("format-version-missing", lambda a: _rewrite(a, lambda d: {k: v for k, v in d.items() if k != "format_version"}),
     "format version None"),
    ("tensors-missing", lambda a: (a / TENSORS_NAME).unlink(), f"{TENSORS_NAME} is missing"),
    ("tensors-truncated", lambda a: _truncate(a / TENSORS_NAME), "truncated"),
    ("tensors-appended", lambda a: (a / TENSORS_NAME).write_bytes((a / TENSORS_NAME).read_bytes() + b"x"),
     "truncated or corrupt"),
    ("tensors-bitflip-data", lambda a: _flip(a / TENSORS_NAME, -5), "sha256 does not match"),
    ("tensors-bitflip-header", lambda a: _flip(a / TENSORS_NAME, 10), "sha256 does not match"),
    ("method-version-7", lambda a: _rewrite(a, lambda d: {**d, "methods": [{**d["methods"][0], "version": 7}]}),
     "version 7"),
    ("method-unknown", lambda a: _rewrite(a, lambda d: {**d, "methods": [{"method": "nonsense", "version": 1,
                                                                          "params": {}}]}), "unknown method 'nonsense'"),
    ("file-entry-traversal", lambda a: _rewrite(a, lambda d: {**d, "files": {"../x.safetensors": {
        "bytes": 1, "sha256": "0" * 64}}}), "unexpected file entry"),
    ("tensors-is-dir", lambda a: ((a / TENSORS_NAME).unlink(), (a / TENSORS_NAME).mkdir()), "is missing"),
]


@pytest.mark.parametrize("damage,match", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_damaged_artifact(art, tmp_path, damage, match):
    damage(art)
    before = snapshot(tmp_path)
    with pytest.raises(ArtifactError, match=match) as e:
        Artifact.load(art)
    assert str(art) in str(e.value)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# accel_config.json: wrong-typed document fields and method params
# ---------------------------------------------------------------------------------------------
def _doc_field(key, value):
    return lambda d: {**d, key: value}


def _drop(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def _files(value):
    return lambda d: {**d, "files": value(d["files"]) if callable(value) else value}


def _entry(**kw):
    return _files(lambda f: {TENSORS_NAME: {**f[TENSORS_NAME], **kw}})


def _method0(**kw):
    return lambda d: {**d, "methods": [{**d["methods"][0], **kw}]}


def _params(cls, **bad):
    """methods = [cls's default config with `bad` params], written as JSON."""
    def fn(d):
        doc = cls().to_dict()
        doc["params"].update(bad)
        return {**d, "methods": [doc]}
    return fn


DOC_CASES = [
    ("methods-missing", _drop("methods"), r"methods"),
    ("methods-empty", _doc_field("methods", []), r"methods"),
    ("methods-str", _doc_field("methods", "identity"), r"methods"),
    ("methods-null", _doc_field("methods", None), r"methods"),
    ("methods-item-int", _doc_field("methods", [1]), r"methods\[0\]"),
    ("method-name-list", _method0(method=["identity"]), r"methods\[0\].*method"),
    ("method-name-missing", lambda d: {**d, "methods": [{"version": 1, "params": {}}]}, r"methods\[0\].*method"),
    ("params-null", _method0(params=None), r"params"),
    ("params-list", _method0(params=[]), r"params"),
    ("params-str", _method0(params="attention"), r"params"),
    ("files-list", _doc_field("files", []), r"files"),
    ("files-null", _doc_field("files", None), r"files"),
    ("files-missing", _drop("files"), r"files"),
    ("files-entry-null", _files({TENSORS_NAME: None}), r"files\[.tensors\.safetensors.\]"),
    ("files-entry-list", _files({TENSORS_NAME: [1, 2]}), r"files\[.tensors\.safetensors.\]"),
    ("files-bytes-str", _entry(bytes="123"), r"bytes"),
    ("files-bytes-bool", _entry(bytes=True), r"bytes"),
    ("files-bytes-negative", _entry(bytes=-1), r"bytes"),
    ("files-bytes-float", _entry(bytes=12.0), r"bytes"),
    ("files-sha-int", _entry(sha256=5), r"sha256"),
    ("files-sha-short", _entry(sha256="abc"), r"sha256"),
    ("files-sha-missing", _files(lambda f: {TENSORS_NAME: {"bytes": f[TENSORS_NAME]["bytes"]}}), r"sha256"),
    ("fingerprint-str", _doc_field("model_fingerprint", "x"), r"model_fingerprint"),
    ("fingerprint-null", _doc_field("model_fingerprint", None), r"model_fingerprint"),
    ("fingerprint-list", _doc_field("model_fingerprint", ["llama"]), r"model_fingerprint"),
    ("calibration-list", _doc_field("calibration", [1]), r"calibration"),
    ("calibration-str", _doc_field("calibration", "wiki"), r"calibration"),
    ("versions-str", _doc_field("library_versions", "0.1"), r"library_versions"),
    ("created-int", _doc_field("created", 5), r"created"),
    # Method params, typed from the config dataclasses' annotations.
    ("gqsa-tile_rows-str", _params(GQSAConfig, tile_rows="1"), r"tile_rows"),
    ("gqsa-owl_lambda-null", _params(GQSAConfig, owl_lambda=None), r"owl_lambda"),
    ("gqsa-bits-float", _params(GQSAConfig, bits=4.0), r"bits"),
    ("gqsa-bits-bool", _params(GQSAConfig, bits=True), r"bits"),
    ("gqsa-sparsity-str", _params(GQSAConfig, sparsity="0.5"), r"sparsity"),
    ("gqsa-targets-str", _params(GQSAConfig, targets="q_proj"), r"targets"),
    ("gqsa-targets-int-items", _params(GQSAConfig, targets=[1, 2]), r"targets"),
    ("gqsa-ignore-null", _params(GQSAConfig, ignore=None), r"ignore"),
    ("gqsa-init-int", _params(GQSAConfig, init=1), r"init"),
    ("gqsa-bqpo_lr-nan", _params(GQSAConfig, bqpo_lr=float("nan")), r"bqpo_lr"),
    ("prune-use_variant-str", _params(PruneConfig, use_variant="yes"), r"use_variant"),
    ("prune-sparsity-nan", _params(PruneConfig, sparsity=float("nan")), r"sparsity"),
    ("prune-max_cycles-float", _params(PruneConfig, max_cycles=1.5), r"max_cycles"),
    ("prune-pattern-list", _params(PruneConfig, pattern=[2, 4]), r"pattern"),
    ("prune-dsnot-int", _params(PruneConfig, dsnot=1), r"dsnot"),
    ("ds-budget-str", _params(DoubleSparsityConfig, budget="1/16"), r"budget"),
    ("ds-heavy_channels-float", _params(DoubleSparsityConfig, heavy_channels=4.0), r"heavy_channels"),
    ("ds-sink-bool", _params(DoubleSparsityConfig, sink=True), r"sink"),
    ("ds-offload_dir-int", _params(DoubleSparsityConfig, offload="disk", offload_dir=3), r"offload_dir"),
    ("rsparse-sparse_share-null", _params(RSparseConfig, sparse_share=None), r"sparse_share"),
    ("rsparse-mode-list", _params(RSparseConfig, mode=["teal"]), r"mode"),
    ("identity-attention-int", _params(IdentityConfig, attention=1), r"attention"),
]


@pytest.mark.parametrize("mutate,match", [c[1:] for c in DOC_CASES], ids=[c[0] for c in DOC_CASES])
def test_wrong_typed_json(art, tmp_path, mutate, match):
    _rewrite(art, mutate)
    before = snapshot(tmp_path)
    with pytest.raises(ArtifactError, match=match) as e:
        Artifact.load(art)
    assert str(art) in str(e.value)
    assert snapshot(tmp_path) == before


def test_wrong_typed_json_patch_is_artifact_error(art):
    """accel.patch reads through Artifact.load, so it gives the same error, not a TypeError."""
    _rewrite(art, _params(GQSAConfig, tile_rows="1"))
    with pytest.raises(ArtifactError, match="tile_rows"):
        accel.patch(accel.models.tiny("llama"), art)


# ---------------------------------------------------------------------------------------------
# Method configs: every method's bad values, named up front
# ---------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
CONFIG_CASES = [
    ("gqsa-owl_lambda-0.9", GQSAConfig, dict(owl_lambda=0.9), r"owl_lambda"),
    ("gqsa-owl_lambda-above-sparsity", GQSAConfig, dict(sparsity=0.1, owl_lambda=0.2), r"owl_lambda"),
    ("gqsa-owl_lambda-neg", GQSAConfig, dict(owl_lambda=-0.1), r"owl_lambda"),
    ("gqsa-owl_m-nan", GQSAConfig, dict(owl_m=NAN), r"owl_m"),
    ("gqsa-owl_m-zero", GQSAConfig, dict(owl_m=0.0), r"owl_m"),
    ("gqsa-bqpo_lr-nan", GQSAConfig, dict(bqpo_lr=NAN), r"bqpo_lr"),
    ("gqsa-bqpo_lr-inf", GQSAConfig, dict(bqpo_lr=INF), r"bqpo_lr"),
    ("gqsa-bqpo_lr-neg", GQSAConfig, dict(bqpo_lr=-1e-3), r"bqpo_lr"),
    ("gqsa-e2e_lr-neg", GQSAConfig, dict(e2e_steps=2, e2e_lr=-1.0), r"e2e_lr"),
    ("gqsa-e2e_lr-zero-with-steps", GQSAConfig, dict(e2e_steps=2, e2e_lr=0.0), r"e2e_lr"),
    ("gqsa-sparsity-nan", GQSAConfig, dict(sparsity=NAN), r"sparsity"),
    ("gqsa-sparsity-1", GQSAConfig, dict(sparsity=1.0, allocation="uniform"), r"sparsity"),
    ("gqsa-group_size-0", GQSAConfig, dict(group_size=0), r"group_size"),
    ("gqsa-tile_rows-0", GQSAConfig, dict(tile_rows=0), r"tile_rows"),
    ("gqsa-bits-5", GQSAConfig, dict(bits=5), r"bits"),
    ("gqsa-bqpo_steps-neg", GQSAConfig, dict(bqpo_steps=-1), r"bqpo_steps"),
    ("gqsa-bqpo_batch-0", GQSAConfig, dict(bqpo_batch=0), r"bqpo_batch"),
    ("gqsa-e2e_batch-0", GQSAConfig, dict(e2e_batch=0), r"e2e_batch"),
    ("gqsa-init-bad", GQSAConfig, dict(init="random"), r"init"),
    ("prune-sparsity-inf", PruneConfig, dict(sparsity=INF), r"sparsity"),
    ("prune-threshold-nan", PruneConfig, dict(threshold=NAN), r"threshold"),
    ("prune-threshold-inf", PruneConfig, dict(threshold=INF), r"threshold"),
    ("prune-pow_var-nan", PruneConfig, dict(pow_var=NAN), r"pow_var"),
    ("prune-pow_var-neg", PruneConfig, dict(pow_var=-1.0), r"pow_var"),
    ("prune-max_cycles-neg", PruneConfig, dict(max_cycles=-1), r"max_cycles"),
    ("prune-pattern-garbled", PruneConfig, dict(pattern="2:x"), r"pattern"),
    ("prune-targets-empty", PruneConfig, dict(targets=[]), r"targets"),
    ("ds-budget-nan", DoubleSparsityConfig, dict(budget=NAN), r"budget"),
    ("ds-budget-inf", DoubleSparsityConfig, dict(budget=INF), r"budget"),
    ("ds-budget-0", DoubleSparsityConfig, dict(budget=0), r"budget"),
    ("ds-budget-2.5", DoubleSparsityConfig, dict(budget=2.5), r"budget"),
    ("ds-heavy_channels-0", DoubleSparsityConfig, dict(heavy_channels=0), r"heavy_channels"),
    ("ds-sink-neg", DoubleSparsityConfig, dict(sink=-1), r"sink"),
    ("ds-label_bits-5", DoubleSparsityConfig, dict(label_bits=5), r"label_bits"),
    ("ds-offload-gpu", DoubleSparsityConfig, dict(offload="gpu"), r"offload"),
    ("rsparse-sparsity-nan", RSparseConfig, dict(sparsity=NAN), r"sparsity"),
    ("rsparse-sparse_share-1.5", RSparseConfig, dict(sparse_share=1.5), r"sparse_share"),
    ("rsparse-sparse_share-nan", RSparseConfig, dict(sparse_share=NAN), r"sparse_share"),
    ("rsparse-mode-bad", RSparseConfig, dict(mode="x"), r"mode"),
    ("rsparse-targets-empty", RSparseConfig, dict(targets=[]), r"targets"),
    ("gqsa-targets-empty", GQSAConfig, dict(targets=[]), r"targets"),
    ("identity-linears-str", IdentityConfig, dict(linears="no"), r"linears"),
]


@pytest.mark.parametrize("cls,kw,match", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_value(tmp_path, monkeypatch, cls, kw, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=match):
        cls(**kw)
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("cls,kw", [
    (GQSAConfig, dict()), (GQSAConfig, dict(sparsity=0.5, owl_lambda=0.25)),
    (GQSAConfig, dict(sparsity=0.9, allocation="uniform", owl_lambda=0.25)), (GQSAConfig, dict(sparsity=0.0)),
    (PruneConfig, dict(threshold=0.0, pow_var=0.0)), (DoubleSparsityConfig, dict(budget=64)),
    (RSparseConfig, dict(sparse_share=1.0, mode="teal")), (GQSAConfig, dict(targets=("q_proj",))),
], ids=["gqsa-default", "gqsa-owl-edge", "gqsa-uniform-ignores-lambda", "gqsa-quant-only-owl", "prune-zero-threshold", "ds-token-budget",
        "rsparse-teal", "gqsa-targets-tuple"])
def test_good_config_value_is_accepted(cls, kw):
    """Controls for the matrix above: the checks do not refuse legal values."""
    c = cls(**kw)
    for k, v in kw.items():
        assert getattr(c, k) == (list(v) if isinstance(v, tuple) else v)


# ---------------------------------------------------------------------------------------------
# Outputs: never replace what accel did not write
# ---------------------------------------------------------------------------------------------
def _user_file(root):
    p = root / "thesis"
    p.write_text("chapter 1")
    return p


def _user_dir(root):
    p = root / "thesis"
    p.mkdir()
    (p / "chapter1.tex").write_text("intro")
    (p / ".hidden").write_text("x")
    return p


def _artifact_with_user_file(root):
    p = _save_identity(root / "art")
    (p / "notes.txt").write_text("mine")
    return p


def _artifact_only(root):
    return _save_identity(root / "art")


def _symlink_to_dir(root):
    d = root / "real"
    d.mkdir()
    (root / "link").symlink_to(d, target_is_directory=True)
    return root / "link"


def _parent_is_file(root):
    (root / "f").write_text("x")
    return root / "f" / "out"


def _save(overwrite):
    def fn(path):
        g = torch.Generator().manual_seed(1)
        Artifact.for_model(_model(), IdentityConfig(), {"identity/z": torch.randn(3, generator=g)}).save(
            path, overwrite=overwrite)
    return fn


def _export_hf(overwrite):
    def fn(path):
        from accel.calibrate.prune import export_hf
        export_hf(path.parent / "no-such-artifact", path, overwrite=overwrite)
    return fn


OUTPUT_CASES = [
    ("save-onto-file", _user_file, _save(False), r"thesis.* is a file"),
    ("save-onto-file-overwrite", _user_file, _save(True), r"thesis.* is a file"),
    ("save-onto-user-dir", _user_dir, _save(False), r"thesis.* not an accel artifact"),
    ("save-onto-user-dir-overwrite", _user_dir, _save(True), r"thesis.* not an accel artifact"),
    ("save-onto-artifact-no-overwrite", _artifact_only, _save(False), r"art already holds an accel artifact; pass --overwrite"),
    ("save-onto-artifact-with-user-file", _artifact_with_user_file, _save(True), r"notes\.txt"),
    ("save-onto-symlink", _symlink_to_dir, _save(True), r"link.* symbolic link"),
    ("save-parent-is-file", _parent_is_file, _save(False), r"f.* not a directory"),
    ("export-hf-onto-file", _user_file, _export_hf(True), r"thesis.* is a file"),
    ("export-hf-onto-user-dir", _user_dir, _export_hf(True), r"thesis.* not an accel"),
    ("export-hf-onto-artifact", _artifact_only, _export_hf(True), r"art.* not an accel hf export"),
]


@pytest.mark.parametrize("setup,write,match", [c[1:] for c in OUTPUT_CASES], ids=[c[0] for c in OUTPUT_CASES])
def test_output_is_refused(tmp_path, setup, write, match):
    target = setup(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ArtifactError, match=match):
        write(target)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("setup,overwrite", [(_user_file, False), (_user_dir, True)],
                         ids=["sglang-onto-file", "sglang-onto-dir"])
def test_sglang_export_output_is_refused(tmp_path, capsys, setup, overwrite):
    from accel.cli import main

    target = setup(tmp_path)
    before = snapshot(tmp_path)
    rc = main(["export", "--format", "sglang-ds", str(tmp_path / "no-such-artifact"), "--output", str(target)]
              + (["--overwrite"] if overwrite else []))
    err = capsys.readouterr().err
    assert rc == 2 and "ArtifactError" in err and "thesis" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_export_does_not_load_a_model_the_artifact_names(tmp_path, monkeypatch):
    """Security: the model an artifact names is not loaded unless the user passes it."""
    from accel.calibrate.prune import export_hf

    art = Artifact.for_model(_model(), PruneConfig(init="magnitude"), {"prune/x": torch.ones(1)},
                             calibration={"model": "evil-org/remote-code-model"}).save(tmp_path / "art")
    loaded = []
    monkeypatch.setattr(accel.models, "load", lambda *a, **k: loaded.append(a) or (_ for _ in ()).throw(
        AssertionError("loaded a model named by the artifact")))
    before = snapshot(tmp_path)
    with pytest.raises(ArtifactError, match=r"evil-org/remote-code-model.*--model"):
        export_hf(art, tmp_path / "hf")
    assert loaded == [] and snapshot(tmp_path) == before


def _prune_artifact(path, model_name="tiny-llama"):
    from accel.calibrate.prune import build_artifact, prune_model

    model = accel.models.tiny("llama")
    cfg = PruneConfig(init="magnitude", sparsity=0.5)
    return build_artifact(model, cfg, prune_model(model, cfg, None, progress=False), {"model": model_name}).save(path)


def test_hf_export_replaced_only_with_overwrite(tmp_path, capsys):
    """An accel hf export carries a manifest, so --overwrite may replace it; without it, refused."""
    from accel.artifact import HF_EXPORT_MARKER
    from accel.cli import main

    art = _prune_artifact(tmp_path / "art")
    cmd = ["export", "--format", "hf", str(art), "--output", str(tmp_path / "hf")]
    assert main(cmd) == 0
    assert (tmp_path / "hf" / HF_EXPORT_MARKER).is_file() and (tmp_path / "hf" / "config.json").is_file()
    before = snapshot(tmp_path)
    assert main(cmd) == 2
    assert "--overwrite" in capsys.readouterr().err and snapshot(tmp_path) == before
    assert main(cmd + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "hf"]
    # A user's file dropped into the export makes it theirs: never replaced.
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert main(cmd + ["--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err and snapshot(tmp_path) == before


def test_hf_export_model_from_the_user(tmp_path, capsys):
    """--model supplies the base model an artifact may not choose; a wrong one is refused by fingerprint."""
    from accel.cli import main

    art = _prune_artifact(tmp_path / "art", model_name="/somewhere/the-artifact-chose")
    before = snapshot(tmp_path)
    assert main(["export", "--format", "hf", str(art), "--output", str(tmp_path / "hf")]) == 2
    assert "--model" in capsys.readouterr().err and snapshot(tmp_path) == before
    assert main(["export", "--format", "hf", str(art), "--output", str(tmp_path / "hf"), "--model", "tiny-qwen2"]) == 2
    assert "different model" in capsys.readouterr().err and snapshot(tmp_path) == before
    assert main(["export", "--format", "hf", str(art), "--output", str(tmp_path / "hf"), "--model", "tiny-llama"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
