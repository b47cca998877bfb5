"""`accel calibrate double-sparsity` and `accel export --format sglang-ds`."""
from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def run_calibration(model_name: str, output: str, channel_type: str = "qk", heavy_channels: int | None = None,
                    n_samples: int = 32, seq_len: int = 512, seed: int = 0, source: str = "wiki",
                    dtype: str = "float32", budget: float = 1 / 16, progress: bool = True,
                    overwrite: bool = False) -> dict:
    """Calibrate, save the artifact to `output` and the SGLang JSON beside it; returns a summary.
    Both outputs are checked (accel.artifact.check_output_path) before the model is loaded."""
    import accel
    from accel.artifact import check_output_path
    from accel.configs.double_sparsity import DoubleSparsityConfig

    from .double_sparsity import SGLANG_JSON, calibrate_double_sparsity, write_sglang_json

    json_out = Path(str(output).rstrip("/") + "." + SGLANG_JSON)
    check_output_path(output, overwrite, "artifact")
    check_output_path(json_out, overwrite, "file")
    cfg = DoubleSparsityConfig(channel_type=channel_type, heavy_channels=heavy_channels, budget=budget)
    t0 = time.perf_counter()
    model, tok = accel.models.load(model_name, dtype=dtype)
    art = calibrate_double_sparsity(model, tok, cfg, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                    source=source, progress=progress)
    # The JSON first: the artifact check re-runs in save(), and a refused JSON leaves no artifact.
    check_output_path(json_out, overwrite, "file")
    path = art.save(output, overwrite=overwrite)
    # Beside the artifact directory, not inside it: the artifact's file list is checksummed.
    json_path = write_sglang_json(art.tensors_for(cfg.method), json_out)
    return {"artifact": str(path), "sglang_json": str(json_path), "channel_type": channel_type,
            "heavy_channels": cfg.channels_for(model.config.head_dim if getattr(model.config, "head_dim", None)
                                               else model.config.hidden_size // model.config.num_attention_heads),
            "tokens": art.calibration["tokens"], "seconds": round(time.perf_counter() - t0, 1)}


def _cmd_calibrate(args) -> int:
    from accel.cli import emit

    r = run_calibration(args.model, args.output, args.channel_type, args.heavy_channels, args.n_samples,
                        args.seq_len, args.seed, args.source, args.dtype, args.budget, progress=not args.json,
                        overwrite=args.overwrite)
    emit(r, args.json, f"wrote {r['artifact']} ({r['channel_type']} channels, r={r['heavy_channels']}, "
                       f"{r['tokens']} calibration tokens, {r['seconds']}s)\nwrote {r['sglang_json']}")
    return 0


def _budget(s: str) -> float:
    import argparse

    try:
        if "/" in s:
            a, b = s.split("/", 1)
            return float(a) / float(b)
        return float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"--budget must be a fraction like 1/16 or a token count, got {s!r}") from None


def _export_sglang(artifact: str, output: str, model: str | None = None, overwrite: bool = False) -> str:
    """`accel export --format sglang-ds ARTIFACT --output FILE` (needs no model)."""
    from accel.artifact import check_output_path

    from .double_sparsity import export_sglang

    check_output_path(output, overwrite, "file")
    return export_sglang(artifact, output)


def register(cli) -> None:
    from accel.cli import add_overwrite

    p = cli.add("calibrate", "double-sparsity", "rank key channels per KV head for Double Sparsity")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--output", required=True, help="artifact directory to write")
    add_overwrite(p)
    p.add_argument("--channel-type", default="qk", choices=["q", "k", "qk"])
    p.add_argument("--heavy-channels", type=int, default=None, help="r label channels (default head_dim/8)")
    p.add_argument("--budget", type=_budget, default=1 / 16,
                   help="runtime token budget stored in the config: fraction like 1/16, or a token count")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default="wiki")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_calibrate)
    cli.exporter("sglang-ds", _export_sglang, "SGLang --ds-channel-config-path JSON from a double-sparsity artifact")
