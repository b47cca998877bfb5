"""`accel calibrate double-sparsity` and `accel export --format sglang-ds`."""
from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def run_calibration(model_name: str, output: str, config=None, spec=None, dtype: str = "float32",
                    progress: bool = True, overwrite: bool = False) -> dict:
    """Calibrate `config` (a DoubleSparsityConfig) on `spec` (accel.data.CalibrationSpec), save the
    artifact to `output` and the SGLang JSON beside it; returns a summary. Both outputs are checked
    (accel.artifact.check_output_path) before the model is loaded."""
    import accel
    from accel.artifact import check_output_path
    from accel.configs.double_sparsity import DoubleSparsityConfig
    from .api import _calibrate  # accel.calibrate, with its before-save hook
    from .double_sparsity import SGLANG_JSON, write_sglang_json
    from .registry import default_spec

    cfg = config or DoubleSparsityConfig()
    spec = spec or default_spec(cfg.method)
    json_out = Path(str(output).rstrip("/") + "." + SGLANG_JSON)
    check_output_path(output, overwrite, "artifact")
    check_output_path(json_out, overwrite, "file")
    t0 = time.perf_counter()
    model, tok = accel.models.load(model_name, dtype=dtype)
    # The JSON is checked again just before the artifact is saved: a refused JSON leaves no artifact.
    # No checkpoints: the calibration is one plain forward, nothing to resume.
    art = _calibrate(model, cfg, spec, output, tokenizer=tok, overwrite=overwrite, progress=progress,
                     checkpoint_dir=False, before_save=lambda art, x: check_output_path(json_out, overwrite, "file"))
    path = art.path
    # Beside the artifact directory, not inside it: the artifact's file list is checksummed.
    json_path = write_sglang_json(art.tensors_for(cfg.method), json_out)
    return {"artifact": str(path), "sglang_json": str(json_path), "channel_type": cfg.channel_type,
            "min_context": cfg.min_context,
            "heavy_channels": cfg.channels_for(model.config.head_dim if getattr(model.config, "head_dim", None)
                                               else model.config.hidden_size // model.config.num_attention_heads),
            "tokens": art.calibration["tokens"], "seconds": round(time.perf_counter() - t0, 1)}


def config_from_args(args):
    from accel.configs.double_sparsity import DoubleSparsityConfig

    extra = {} if args.min_context is None else {"min_context": args.min_context}
    return DoubleSparsityConfig(channel_type=args.channel_type, heavy_channels=args.heavy_channels,
                                budget=args.budget, **extra)


def _cmd_calibrate(args) -> int:
    from accel.cli import calibration_spec, emit

    r = run_calibration(args.model, args.output, config_from_args(args), calibration_spec(args), args.dtype,
                        progress=not args.json, overwrite=args.overwrite)
    emit(r, args.json, f"wrote {r['artifact']} ({r['channel_type']} channels, r={r['heavy_channels']}, "
                       f"min_context={r['min_context']}, {r['tokens']} calibration tokens, {r['seconds']}s)"
                       f"\nwrote {r['sglang_json']}")
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
    from accel.cli import add_calibration_args
    from accel.configs.double_sparsity import DoubleSparsityConfig

    p = cli.add("calibrate", "double-sparsity", "rank key channels per KV head for Double Sparsity")
    # Attention only (no --targets/--ignore); one statistics pass, nothing to checkpoint.
    add_calibration_args(p, "double-sparsity", linears=False, checkpoints=False)
    p.add_argument("--channel-type", default="qk", choices=["q", "k", "qk"])
    p.add_argument("--heavy-channels", type=int, default=None, help="r label channels (default head_dim / channel_divisor = head_dim/4)")
    p.add_argument("--budget", type=_budget, default=1 / 16,
                   help="runtime token budget stored in the config: fraction like 1/16, or a token count")
    p.add_argument("--min-context", type=int, default=None, metavar="TOKENS",
                   help=f"decode steps with fewer cached tokens stay dense; 0 = every decode step sparse "
                        f"(stored in the artifact; default {DoubleSparsityConfig.min_context})")
    p.set_defaults(func=_cmd_calibrate, make_config=config_from_args)
    cli.exporter("sglang-ds", _export_sglang, "SGLang --ds-channel-config-path JSON from a double-sparsity artifact")
