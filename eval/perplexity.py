"""Perplexity over non-overlapping windows of the evaluation text.

Protocol: tokenize the text without special tokens, cut the first `max_tokens` into windows of
`seq_len`, score each window independently (seq_len - 1 predicted tokens each), and report
exp(total NLL / predicted tokens). A trailing partial window is dropped.
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


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int  # tokens scored
    windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, seq_len: int = 512, batch_size: int = 4,
               progress: bool = True, desc: str = "ppl") -> PerplexityResult:
    """tokens: [N] int64. Returns the perplexity of `model` over floor(N / seq_len) windows.

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
    n_win = tokens.numel() // seq_len
    if n_win == 0:
        raise DataError(f"{tokens.numel()} tokens are fewer than one window of seq_len={seq_len}")
    windows = tokens[: n_win * seq_len].view(n_win, seq_len)
    device = next(model.parameters()).device
    nll, count, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(total=n_win, desc=desc, unit="win", disable=not progress, leave=False)
    for start in range(0, n_win, batch_size):
        x = windows[start:start + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1),
                               reduction="sum")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss in windows {start}..{start + x.size(0) - 1}")
        nll += loss.item()
        count += x[:, 1:].numel()
        bar.update(x.size(0))
    bar.close()
    res = PerplexityResult(math.exp(nll / count), nll, count, n_win, seq_len, time.perf_counter() - t0)
    log.info("ppl %.4f over %d tokens (%d windows of %d) in %.1fs", res.ppl, count, n_win, seq_len, res.seconds)
    return res
