"""What a `generate()` user sees on CPU, for every matrix row against dense bf16, measured in one
process: prefill seconds and decode tokens/s at each context and thread count.

One `generate()` call per measurement: a stopping criterion (called by generate after every new
token) stamps the time, so prefill = time to the first new token, and decode tok/s =
(N - 1) / (time of token N - time of token 1). (eval/bench_decode.py times two generate() calls,
with N and 1 new tokens; at an 8K context that is one 8K prefill more per measurement.)

Interleaved: each round patches every row in turn onto the same bf16 model (the artifact as
saved, its own config: what `accel.patch` gives a user), measures every context and thread count,
and unpatches it, so load from other processes on a shared machine hits every row alike; the
medians over rounds are compared with the dense row of the same run.
"""
from __future__ import annotations

import logging
import statistics
import time

import torch

log = logging.getLogger(__name__)


class _StepTimer:
    """A transformers StoppingCriteria that never stops and records when each token arrived."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one greedy `model.generate(ids, new_tokens)`."""
    from transformers import StoppingCriteriaList

    timer = _StepTimer()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       stopping_criteria=StoppingCriteriaList([timer]))
    s = timer.stamps
    prefill = s[0] - t0
    decode = (len(s) - 1) / max(s[-1] - s[0], 1e-9) if len(s) > 1 else float("nan")
    return prefill, decode


def prompt_ids(tok, model, context: int) -> torch.Tensor:
    """[1, context] prose tokens (the wiki evaluation text), led by BOS when the tokenizer adds one."""
    from accel.data import eval_tokens

    bos = getattr(model.config, "accel_bos_token_id", None)
    ids = eval_tokens(tok, "wiki", context - (bos is not None))
    if bos is not None:
        ids = torch.cat([torch.tensor([bos]), ids])
    return ids.view(1, -1)


def measure_speed(model, tok, artifacts: dict, contexts=(1024, 8192), threads=(1, 2), rounds: int = 3,
                  new_tokens: int = 32, on_patched=None) -> dict:
    """artifacts: row -> Artifact (None for dense; "dense" must be among them). Returns
    row -> {"<ctx>/<t>t": {"prefill_s", "decode_tok_s", "prefill_speedup", "decode_speedup"}}.
    on_patched(row, model): called once per row while it is patched (weight bytes are read then)."""
    import accel

    if "dense" not in artifacts:
        raise ValueError("measure_speed: the dense row is the baseline and must be measured")
    prompts = {c: prompt_ids(tok, model, c) for c in contexts}
    warm = prompts[min(contexts)][:, :16]
    times = {(r, c, t): [] for r in artifacts for c in contexts for t in threads}
    old = torch.get_num_threads()
    seen = set()
    n_cells, done, t_start = rounds * len(artifacts), 0, time.perf_counter()
    try:
        for rd in range(rounds):
            for row, art in artifacts.items():
                t_row = time.perf_counter()
                if art is not None:
                    accel.patch(model, art)
                try:
                    if row not in seen and on_patched is not None:
                        on_patched(row, model)
                    seen.add(row)
                    for t in threads:
                        torch.set_num_threads(t)
                        timed_generate(model, warm, 2)  # first-call costs (kernel set-up) stay out of the rounds
                        for c in contexts:
                            times[(row, c, t)].append(timed_generate(model, prompts[c], new_tokens))
                finally:
                    if art is not None:
                        accel.unpatch(model)
                done += 1
                el = time.perf_counter() - t_start
                log.info("speed round %d/%d, row %s: %.0fs (%d/%d, ~%.0f min left)", rd + 1, rounds, row,
                         time.perf_counter() - t_row, done, n_cells, el / done * (n_cells - done) / 60)
    finally:
        torch.set_num_threads(old)
    out: dict = {}
    for (row, c, t), v in times.items():
        out.setdefault(row, {})[f"{c}/{t}t"] = {"prefill_s": statistics.median(p for p, _ in v),
                                                "decode_tok_s": statistics.median(d for _, d in v)}
    for row, cells in out.items():
        for k, cell in cells.items():
            base = out["dense"][k]
            cell["prefill_speedup"] = base["prefill_s"] / cell["prefill_s"]
            cell["decode_speedup"] = cell["decode_tok_s"] / base["decode_tok_s"]
    return out


def weight_bytes(model, dense_total_bf16: int) -> dict:
    """Weight bytes of the patched `model` (accel.report: what the replaced linears store, the rest
    counted as dense bf16) against the whole model in bf16."""
    import accel

    t = accel.report(model).totals()
    total = dense_total_bf16 - t.dense_bf16_bytes + t.weight_bytes
    return {"weight_bytes": int(total), "dense_bf16_bytes": int(dense_total_bf16),
            "weight_ratio": total / dense_total_bf16,
            "linears_patched": t.linears, "linears_ratio": t.ratio}


def model_bf16_bytes(model) -> int:
    """Every (unique: tied weights once) parameter of the unpatched model, as bf16."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return 2 * n
