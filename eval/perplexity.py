"""Perplexity over non-overlapping windows of the evaluation text.

Protocol: tokenize the text without special tokens, cut the first `max_tokens` into windows of
`seq_len`, score each window independently (seq_len - 1 predicted tokens each), and report
exp(total NLL / predicted tokens). A trailing partial window is dropped.

BOS: for a model whose tokenizer puts BOS before a text (Gemma), each window is BOS + seq_len - 1
text tokens: the model sees seq_len positions, all seq_len - 1 text tokens are predicted (the first
from the BOS), and the BOS itself is never a target. Without BOS (SmolLM2, Qwen) a window is
seq_len text tokens, of which the first is context only.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# Logits are [batch, seq_len, vocab]: with Gemma's 262K vocab a batch of 4 windows of 2048 is
# 4.3 GB in bf16 and 8.6 GB more as fp32 for the loss (a 24 GB machine ran out of memory). The
# batch is cut so that its logits stay under this many fp32 bytes, and the loss is taken over
# chunks of positions so that the fp32 copy is never whole.
LOGITS_BUDGET_BYTES = 1 << 30
LOSS_CHUNK = 512


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int  # tokens scored
    windows: int
    seq_len: int
    seconds: float
    bos_token_id: int | None = None  # the BOS put before each window, None when none

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, seq_len: int = 512, batch_size: int = 4,
               progress: bool = True, desc: str = "ppl", bos_token_id: int | None | str = "auto") -> PerplexityResult:
    """tokens: [N] int64 text tokens (no BOS). Returns the perplexity of `model` over
    floor(N / seq_len) windows, or floor(N / (seq_len - 1)) when each window is led by a BOS.

    bos_token_id: the id to put before each window, None for none; "auto" takes the one
    `accel.models.load` recorded from the model's tokenizer (`accel.data.bos_token_id(tok)`
    gives it for a model loaded otherwise).
    DataError (a ValueError) for bad tokens or a seq_len outside [2, max_position_embeddings]:
    past the positions it was trained on, a model's perplexity means nothing."""
    from accel.data import DataError

    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise DataError(f"tokens must be a 1-D tensor, got {getattr(tokens, 'shape', type(tokens).__name__)}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if isinstance(max_pos, int) and seq_len > max_pos:
        raise DataError(f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}")
    if bos_token_id == "auto":
        if not hasattr(cfg, "accel_bos_token_id"):
            # Only accel.models.load records the tokenizer's BOS; scoring a BOS model (Gemma) without
            # it inflates its perplexity, so say so rather than guess.
            mt = str(getattr(cfg, "model_type", "") or "")
            need = (f" A {mt} model needs its BOS before each window: pass "
                    f"bos_token_id=accel.data.bos_token_id(tokenizer).") if mt.startswith("gemma") else ""
            log.warning("perplexity: bos_token_id='auto' found no BOS recorded on the model (it was not loaded "
                        "with accel.models.load); scoring without BOS. Pass bos_token_id= explicitly "
                        "(accel.data.bos_token_id(tokenizer), or None for none).%s", need)
        bos_token_id = getattr(cfg, "accel_bos_token_id", None)
    if bos_token_id is not None and (not isinstance(bos_token_id, int) or isinstance(bos_token_id, bool)
                                     or bos_token_id < 0):
        raise DataError(f"bos_token_id must be a token id, None or 'auto', got {bos_token_id!r}")
    step = seq_len - (bos_token_id is not None)
    n_win = tokens.numel() // step
    if n_win == 0:
        raise DataError(f"{tokens.numel()} tokens are fewer than one window of seq_len={seq_len}")
    windows = tokens[: n_win * step].view(n_win, step)
    if bos_token_id is not None:
        windows = torch.cat([torch.full((n_win, 1), bos_token_id, dtype=windows.dtype), windows], dim=1)
    device = next(model.parameters()).device
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        batch_size = max(1, min(batch_size, LOGITS_BUDGET_BYTES // (seq_len * vocab * 4)))
    nll, count, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(total=n_win, desc=desc, unit="win", disable=not progress, leave=False)
    for start in range(0, n_win, batch_size):
        x = windows[start:start + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits
        loss = sum(F.cross_entropy(logits[:, p:min(p + LOSS_CHUNK, seq_len - 1)].reshape(-1, logits.size(-1)).float(),
                                   x[:, p + 1:p + 1 + LOSS_CHUNK].reshape(-1), reduction="sum")
                   for p in range(0, seq_len - 1, LOSS_CHUNK))
        del logits
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss in windows {start}..{start + x.size(0) - 1}")
        nll += loss.item()
        count += x[:, 1:].numel()
        bar.update(x.size(0))
    bar.close()
    res = PerplexityResult(math.exp(nll / count), nll, count, n_win, seq_len, time.perf_counter() - t0, bos_token_id)
    log.info("ppl %.4f over %d tokens (%d windows of %d) in %.1fs", res.ppl, count, n_win, seq_len, res.seconds)
    return res
