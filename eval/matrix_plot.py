"""Plots of `accel eval matrix --plot DIR` (written through accel.artifact.save_figure: checked, atomic):

- `matrix-<model>-scatter.png`, one per model: perplexity ratio to dense (wiki) against decode
  speedup at the largest context and thread count; the dense row sits at (1, 1);
- `matrix-decode-speedup.png`: decode speedup of every row, one group of bars per model, one bar
  per context and thread count.
"""
from __future__ import annotations

from pathlib import Path


def plot_paths(plot_dir, models) -> list[Path]:
    from .matrix_rows import safe_name

    d = Path(plot_dir)
    return [d / f"matrix-{safe_name(m)}-scatter.png" for m in models] + [d / "matrix-decode-speedup.png"]


def check_outputs(output, plot_dir, models, has_speed: bool, overwrite: bool, no_speed: str) -> None:
    """Before any work: the results file and every plot may be written (accel.artifact's rule for a
    user's file); ConfigError `no_speed` when plots are asked for without speed measurements."""
    from accel.artifact import check_output_path

    check_output_path(output, overwrite, "file")
    if plot_dir:
        if not has_speed:
            from accel.configs import ConfigError

            raise ConfigError(no_speed)
        for p in plot_paths(plot_dir, models):
            check_output_path(p, overwrite, "file")


def _label(key: str) -> str:
    """"8192/2t" -> "8192 tokens, 2 threads"."""
    c, t = key[:-1].split("/")
    return f"{c} tokens, {t} thread{'s' * (t != '1')}"


def _figure(*args, **kw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kw)


def plot_matrix(records: list[dict], plot_dir, settings, overwrite: bool = False) -> list[Path]:
    from accel.artifact import save_figure

    models = list(dict.fromkeys(r["model"] for r in records))
    paths = plot_paths(plot_dir, models)
    key = f"{max(settings.contexts)}/{max(settings.threads)}t"
    for m, path in zip(models, paths):
        rows = [r for r in records if r["model"] == m and "speed" in r]
        dense = next((r for r in records if r["model"] == m and r["row"] == "dense"), None)
        fig, ax = _figure(figsize=(6.5, 4.5))
        for r in rows:
            x = r["speed"][key]["decode_speedup"]
            y = r["ppl"]["wiki"] / dense["ppl"]["wiki"] if dense else r["ppl"]["wiki"]
            ax.scatter([x], [y], marker="*" if "+" in r["row"] else "o", s=60)
            ax.annotate(r["row"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axvline(1.0, color="grey", lw=0.6, ls="--")
        ax.set_xlabel(f"decode speedup vs dense bf16 ({_label(key)})")
        ax.set_ylabel("wiki perplexity / dense" if dense else "wiki perplexity")
        ax.set_yscale("log")
        ax.set_title(f"{m}: accuracy vs speed (CPU, generate())")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, path, overwrite)
    keys = [f"{c}/{t}t" for c in settings.contexts for t in settings.threads]
    fig, axes = _figure(len(models), 1, figsize=(9, 3.2 * len(models)), squeeze=False)
    for ax, m in zip(axes[:, 0], models):
        rows = [r for r in records if r["model"] == m and "speed" in r]
        w = 0.8 / max(1, len(keys))
        for j, k in enumerate(keys):
            ax.bar([i + j * w for i in range(len(rows))], [r["speed"][k]["decode_speedup"] for r in rows], w,
                   label=_label(k))
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(rows))], [r["row"] for r in rows], rotation=20,
                      fontsize=8)
        ax.set_ylabel("decode speedup")
        ax.set_title(m)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, paths[-1], overwrite)
    return paths
