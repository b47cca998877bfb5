"""`accel.compile(model)`: compiled decode steps for `generate()` on CPU (and GPU), patched or not.

What it sets (docs/compile.md says why):
- `generation_config.cache_implementation = "static"`: fixed cache shapes, so one compiled graph
  serves every decode step (a dynamic cache grows by one token a step and would recompile or go
  symbolic). Double Sparsity's label cache becomes a static layer too (patches/ds_cache.py).
- `generation_config.compile_config`: transformers compiles the decode forward itself (the prefill
  stays eager: its shape changes with every prompt), with `torch.compile(backend, mode, fullgraph,
  dynamic=False)`; transformers does this only on GPUs unless told to (compat.compile_config).
  accel's kernels are custom ops (accel/kernels/ops.py), so `fullgraph=True` holds for every method.
- fast plain linears (`fast_linears=True`, CPU): every plain bf16 `nn.Linear` left in the model
  (a dense model's, a patched model's lm_head) becomes a `FastLinear` (patches/fast_linear.py),
  whose decode steps run the native GEMV `accel::dense_linear` (an op defined in C++, so the
  compiled graph calls it with no Python body). `fast_linears=False` puts nn.Linear back.
- an optional warm-up `generate()` that pays the compile once and reports its seconds. The compiled
  function lives on the model (transformers' `_compiled_call`), so later calls in the process reuse
  it; a second `accel.compile` with the same settings returns at once (`reused=True`).
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

log = logging.getLogger(__name__)

_ATTR = "_accel_compile"


@dataclasses.dataclass
class CompileInfo:
    """What `accel.compile` did: settings, warm-up seconds (the compile, mostly) and reuse."""

    backend: str
    mode: str | None
    fullgraph: bool
    max_cache_len: int | None
    seconds: float
    reused: bool
    # Plain linears computing with accel::dense_linear after this call (0: off, or nothing eligible).
    fast_linears: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def compile(model, *, backend: str = "inductor", mode: str | None = None, fullgraph: bool = True,
            max_cache_len: int | None = None, warmup: bool = True, warmup_tokens: int = 3,
            fast_linears: bool = True) -> CompileInfo:
    """Make `model.generate()` run compiled decode steps over a static cache.

    backend/mode/fullgraph: passed to torch.compile (mode None = inductor's default, the fastest
    CPU decode measured here; "reduce-overhead" adds CUDA graphs on a GPU). max_cache_len: the
    static cache's size for every call (None: transformers sizes it per call, prompt + new tokens,
    never shrinking, so growing lengths recompile). fast_linears: swap the plain bf16 CPU linears
    for FastLinear (False: undo that swap). warmup: run a short generate() now, so the
    compile time is paid and reported here rather than inside the first real call.
    Call it after `accel.patch` (a later patch or unpatch changes the modules the graph holds, and
    the next call recompiles)."""
    from accel.patches import compat, fast_linear

    if fast_linears:
        fast_linear.apply(model)
    else:
        fast_linear.remove(model)
    n_fast = len(fast_linear.swapped(model))
    # The module classes are part of the key: a swap since the last call (or a patch that
    # replaced FastLinears) means the compiled step must be rebuilt by a new warm-up.
    key = (backend, mode, bool(fullgraph), max_cache_len, n_fast)
    # The generation-config settings are set every call: the user may have changed
    # cache_implementation or compile_config since, and reuse means only that the warm-up (the
    # compile) is skipped.
    gc = model.generation_config
    gc.cache_implementation = "static"
    if max_cache_len is not None:
        gc.max_cache_len = int(max_cache_len)
    gc.compile_config = compat.compile_config(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=False)
    prev = getattr(model, _ATTR, None)
    if prev is not None and prev[0] == key:
        info = dataclasses.replace(prev[1], reused=True)
        log.info("accel.compile: reusing the compiled decode step (%s)", backend)
        return info
    seconds = 0.0
    if warmup:
        ids = torch.ones(1, 4, dtype=torch.long, device=next(model.parameters()).device)
        t = time.perf_counter()
        with torch.inference_mode():
            # Two decode steps at least: the first compiled call compiles, the second checks reuse.
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max(2, warmup_tokens),
                           min_new_tokens=max(2, warmup_tokens), do_sample=False, pad_token_id=0)
        seconds = time.perf_counter() - t
        log.info("accel.compile: %s decode step compiled in %.1f s", backend, seconds)
    info = CompileInfo(backend, mode, bool(fullgraph), max_cache_len, seconds, False, n_fast)
    model.__dict__[_ATTR] = (key, info)
    return info
