"""`accel eval ppl` and `accel demo` (the README's main job)."""
from __future__ import annotations

import argparse
import logging
import time

log = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m, qwen2.5-0.5b, gemma3-270m (embedded), a hub name or a local dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--source", "--corpus", dest="source", default="wiki",
                   help="evaluation text: wiki or shakespeare (offline; the second is another domain), "
                        "or wikitext2/c4/pileval (online)")


def evaluate_ppl(model_name: str = "smollm2-135m", artifact: str | None = None, seq_len: int = 512,
                 max_tokens: int = 16384, dtype: str = "float32", source: str = "wiki",
                 batch_size: int = 4, progress: bool = True) -> dict:
    """Load a model, optionally patch it with an artifact, and return its perplexity as a dict."""
    import accel
    from accel.data import bos_token_id, eval_tokens

    from .perplexity import perplexity

    # Load (and so validate) the artifact before the model: a bad path fails in a second, not after a load.
    art = accel.Artifact.load(artifact) if artifact else None
    model, tok = accel.models.load(model_name, dtype=dtype)
    if art is not None:
        accel.patch(model, art)
    ids = eval_tokens(tok, source, max_tokens)
    res = perplexity(model, ids, seq_len=seq_len, batch_size=batch_size, progress=progress,
                     bos_token_id=bos_token_id(tok))
    return {"model": model_name, "artifact": artifact, "source": source, "dtype": dtype, **res.to_dict()}


def _cmd_ppl(args) -> int:
    from accel.cli import emit

    r = evaluate_ppl(args.model, args.artifact, args.seq_len, args.max_tokens, args.dtype, args.source,
                     args.batch_size, progress=not args.json)
    emit(r, args.json, f"ppl {r['ppl']:.4f} over {r['tokens']} tokens ({r['windows']} x {r['seq_len']}) "
                       f"in {r['seconds']:.1f}s")
    return 0


def _ds_step(model, tok, ids, seq_len):
    from .sweep_ds import demo_step
    return demo_step(model, tok)


def _wanda_step(model, tok, ids, seq_len):
    from .sweep_prune import demo_step
    return demo_step(model, tok, ids, seq_len)


def _rsparse_step(model, tok, ids, seq_len):
    from .sweep_rsparse import demo_step
    return demo_step(model, tok, ids, seq_len)


def _gqsa_step(model, tok, ids, seq_len):
    from .sweep_gqsa import demo_step
    return demo_step(model, tok, ids, seq_len)


# The main job's method steps: `fn(model, tok, eval_ids, seq_len) -> dict`, each printing its own
# line and leaving `model` unpatched.
DEMO_STEPS = [
    ("double_sparsity", _ds_step),
    ("wanda", _wanda_step),
    ("rsparse", _rsparse_step),
    ("gqsa", _gqsa_step),
]


def run_demo(model_name: str = "smollm2-135m", max_tokens: int = 16384, seq_len: int = 512,
             prompt: str = "The capital of France is") -> dict:
    """The main job: load the model, generate a sentence, print dense perplexity."""
    import torch

    import accel
    from accel.data import bos_token_id, eval_tokens

    from .perplexity import perplexity

    t0 = time.perf_counter()
    model, tok = accel.models.load(model_name)
    load_s = time.perf_counter() - t0
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    print(f"[load] {model_name} in {load_s:.1f}s")
    print(f"[generate] {text!r}")
    dense = perplexity(model, eval_tokens(tok, "wiki", max_tokens), seq_len=seq_len, desc="dense ppl",
                       bos_token_id=bos_token_id(tok))
    print(f"[dense] ppl {dense.ppl:.3f} over {dense.tokens} tokens ({dense.windows} x {seq_len})")
    out = {"generated": text, "dense_ppl": dense.ppl, "tokens": dense.tokens}
    eval_ids = eval_tokens(tok, "wiki", max_tokens)
    for name, step in DEMO_STEPS:
        out[name] = step(model, tok, eval_ids, seq_len)
    return out


def _cmd_demo(args) -> int:
    from accel.cli import emit

    r = run_demo(args.model, args.max_tokens, args.seq_len)
    emit(r, args.json)
    return 0


def register(cli) -> None:
    p = cli.add("eval", "ppl", "perplexity of a model, optionally patched with an artifact")
    add_model_args(p)
    p.add_argument("--artifact", default=None, help="artifact directory to patch in")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
    p.set_defaults(func=_cmd_ppl)

    d = cli.command("demo", "main job: load SmolLM2, generate, dense perplexity, then one step per method")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--max-tokens", type=int, default=16384)
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_cmd_demo)

    from .bench_decode import register as _register_bench_decode  # accel bench decode (issue 19)
    _register_bench_decode(cli)

    from .matrix_cli import register as _register_matrix  # accel eval matrix (issue 16)
    _register_matrix(cli)

    from .matrix_merge import register as _register_matrix_merge  # accel eval matrix-merge (issue 16)
    _register_matrix_merge(cli)
