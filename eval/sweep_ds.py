"""Double Sparsity perplexity sweep: budget x heavy channels, against four baselines.

Rows: dense; "ds" (calibrated channels); "random" (random channels per KV head, seeded);
"sink_recent" (only the first `sink` and the last budget - sink tokens, StreamingLLM-like);
"oracle" (exact top-k over all head_dim channels). Columns: "1/8,r=8" etc. Rows that do not
depend on r (dense, sink_recent, oracle) are measured once per budget and repeated across r.

All sparse rows use the evaluation mode (selection applied causally to every query row) with
`min_context=0`, so every row of every window beyond the budget is sparse.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from fractions import Fraction

import torch

log = logging.getLogger(__name__)

ROWS = ("dense", "ds", "random", "sink_recent", "oracle")


def budget_name(b: float) -> str:
    if b <= 1:
        f = Fraction(b).limit_denominator(1024)
        return f"{f.numerator}/{f.denominator}"
    return str(int(b))


def column_name(budget: float, r: int) -> str:
    return f"{budget_name(budget)},r={r}"


def random_order(layers: int, kv_heads: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    """[L, KVH, D] int64: an independent random channel permutation per layer and KV head."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(head_dim, generator=g) for _ in range(kv_heads)])
                        for _ in range(layers)])


def _ppl(model, tokens, seq_len, batch_size, desc):
    from .perplexity import perplexity

    return perplexity(model, tokens, seq_len=seq_len, batch_size=batch_size, progress=False, desc=desc).ppl


def run_sweep(model, tokens: torch.Tensor, artifact, budgets=(1 / 4, 1 / 8, 1 / 16), channels=None,
              rows=ROWS, seq_len: int = 2048, batch_size: int = 2, base=None, seed: int = 0,
              progress: bool = True) -> dict:
    """Returns {"table": row -> column -> ppl, "seconds": {...}, ...}. `artifact` is a loaded
    double-sparsity Artifact calibrated for `model`; `base` a DoubleSparsityConfig whose budget,
    heavy_channels and min_context are overridden per cell."""
    from tqdm.auto import tqdm

    import accel
    from accel.artifact import Artifact
    from accel.configs.double_sparsity import DoubleSparsityConfig
    from accel.patches.double_sparsity import model_dims

    unknown = set(rows) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown sweep rows {sorted(unknown)}; choose from {ROWS}")
    artifact.check_model(model)
    dims = model_dims(model)
    D = dims["head_dim"]
    channels = list(channels or (D // 16, D // 8, D // 4))
    for r in channels:
        if not 1 <= r <= D:
            raise ValueError(f"heavy channels r={r} must be in [1, head_dim={D}]")
    base = base or DoubleSparsityConfig()
    base = dataclasses.replace(base, min_context=0, score_mode="sparse")
    ds_tensors = artifact.tensors_for("double-sparsity")
    order_key = f"order_{base.channel_type}"
    rand = random_order(dims["layers"], dims["kv_heads"], D, seed)

    def measure(cfg, order, desc):
        art = Artifact(configs=[cfg], tensors={f"double-sparsity/{order_key}": order}, fingerprint=artifact.fingerprint)
        with accel.patched(model, art, check_fingerprint=False):
            return _ppl(model, tokens, seq_len, batch_size, desc)

    jobs = []
    if "dense" in rows:
        jobs.append(("dense", None, None))
    for b in budgets:
        for row in ("sink_recent", "oracle"):
            if row in rows:
                jobs.append((row, b, None))
        for r in channels:
            for row in ("ds", "random"):
                if row in rows:
                    jobs.append((row, b, r))
    table: dict[str, dict[str, float]] = {row: {} for row in rows}
    secs: dict[str, float] = {}
    bar = tqdm(jobs, desc="ds-sweep", unit="cell", disable=not progress)
    for row, b, r in bar:
        t0 = time.perf_counter()
        bar.set_postfix_str(f"{row} {'' if b is None else budget_name(b)} {'' if r is None else f'r={r}'}")
        if row == "dense":
            ppl = _ppl(model, tokens, seq_len, batch_size, "dense")
            for bb in budgets:
                for rr in channels:
                    table["dense"][column_name(bb, rr)] = ppl
        elif row == "sink_recent":
            # Recent larger than any budget: the budget is split into sink + recent only.
            cfg = dataclasses.replace(base, budget=b, heavy_channels=1, recent=seq_len)
            ppl = measure(cfg, ds_tensors[order_key], "sink_recent")
            for rr in channels:
                table[row][column_name(b, rr)] = ppl
        elif row == "oracle":
            cfg = dataclasses.replace(base, budget=b, heavy_channels=D)
            ppl = measure(cfg, ds_tensors[order_key], "oracle")
            for rr in channels:
                table[row][column_name(b, rr)] = ppl
        else:
            cfg = dataclasses.replace(base, budget=b, heavy_channels=r)
            ppl = measure(cfg, ds_tensors[order_key] if row == "ds" else rand, row)
            table[row][column_name(b, r)] = ppl
        secs[f"{row} {'' if b is None else budget_name(b)} {'' if r is None else r}".strip()] = round(
            time.perf_counter() - t0, 1)
        log.info("%s budget=%s r=%s: ppl %.4f (%.0fs)", row, b, r, ppl, time.perf_counter() - t0)
    return {"table": table, "columns": [column_name(b, r) for b in budgets for r in channels],
            "tokens": int(tokens.numel()), "seq_len": seq_len, "seconds": secs,
            "config": {k: v for k, v in dataclasses.asdict(base).items() if k not in ("budget", "heavy_channels")}}


def format_table(res: dict) -> str:
    cols = res["columns"]
    w = max(11, *(len(c) for c in cols))
    lines = ["row".ljust(12) + "".join(c.rjust(w + 1) for c in cols)]
    for row, vals in res["table"].items():
        lines.append(row.ljust(12) + "".join(f"{vals.get(c, float('nan')):.3f}".rjust(w + 1) for c in cols))
    return "\n".join(lines)


def plot_sweep(res: dict, path: str, r: int | None = None, overwrite: bool = False) -> str:
    """Perplexity against budget fraction, one line per method (DS and random at one r)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = res["columns"]
    rs = sorted({int(c.split("r=")[1]) for c in cols})
    r = r if r in rs else rs[len(rs) // 2]
    budgets = [c.split(",")[0] for c in cols if c.endswith(f"r={r}")]
    xs = [float(Fraction(b)) for b in budgets]
    fig, ax = plt.subplots(figsize=(6, 4))
    for row, vals in res["table"].items():
        ys = [vals.get(f"{b},r={r}", float("nan")) for b in budgets]
        label = {"ds": f"Double Sparsity (r={r})", "random": f"random channels (r={r})"}.get(row, row)
        ax.plot(xs, ys, marker="o", label=label, linestyle="--" if row == "dense" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, budgets)
    ax.set_yscale("log")
    ax.set_xlabel("token budget (fraction of the 2048-token window)")
    ax.set_ylabel("perplexity")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from accel.artifact import save_figure

    save_figure(fig, path, overwrite)
    return path


def demo_step(model, tok, max_tokens: int = 4096, seq_len: int = 1024, budget: float = 1 / 8) -> dict:
    """`accel demo`'s Double Sparsity step: calibrate on 8 x 256 tokens, then perplexity with
    the selection applied to every query row, beside dense on the same tokens."""
    import accel
    from accel.calibrate.double_sparsity import calibrate_double_sparsity
    from accel.configs.double_sparsity import DoubleSparsityConfig
    from accel.data import eval_tokens

    t0 = time.perf_counter()
    cfg = DoubleSparsityConfig(budget=budget, min_context=0)
    art = calibrate_double_sparsity(model, tok, cfg, n_samples=8, seq_len=256, progress=False)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    r = cfg.channels_for(head_dim)
    tokens = eval_tokens(tok, "wiki", max_tokens)
    dense = _ppl(model, tokens, seq_len, 2, "dense")
    with accel.patched(model, art):
        ds = _ppl(model, tokens, seq_len, 2, "ds")
    print(f"[double-sparsity] budget {budget_name(budget)}, r={r} of head_dim {head_dim}, {cfg.label_bits}-bit labels: ppl {ds:.3f} vs dense {dense:.3f} "
          f"({100 * (ds / dense - 1):+.1f}%) over {tokens.numel()} tokens ({seq_len}-token windows), "
          f"{time.perf_counter() - t0:.0f}s")
    return {"ds_ppl": ds, "dense_ppl": dense, "budget": budget}
