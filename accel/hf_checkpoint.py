"""Saving a patched model as a standard HF checkpoint that `from_pretrained` loads patched.

    DIR/config.json          the model config + quantization_config = {"quant_method": "accel",
                             "format_version": 1, "methods": [MethodConfig.to_dict(), ...] (patch
                             order), "fingerprint": {...}, "accel_version": ...}
    DIR/model*.safetensors   untouched modules' dense weights under their usual names; each
                             swapped linear's compressed tensors under its own path (GQSA:
                             qweight, colmask, scales, zeros, meta, bias; prune: the masked
                             weight + packed mask; R-Sparse: weight, threshold, s_rho, down, up);
                             whole-model tensors as "accel.<method>.<name>" (Double Sparsity's
                             channel order). Every dense weight a patched module keeps (and DS's
                             q/k projections) is stored as "<module>.accel_weight" with an empty
                             "<module>.weight": without accel, loading stops on its shape.
    DIR/README.md            model card: methods, settings, measured accuracy when given
    DIR/accel_export.json    manifest of what accel wrote (lets --overwrite replace it)

Which leaves a method stores is its `CheckpointFormat` (registered next to its applier in
accel/patches/<method>.py). A method without one cannot be saved: saving raises, naming it.
Loading: accel/hf_checkpoint_load.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .artifact import (HF_EXPORT_FORMAT, HF_EXPORT_MARKER, Artifact, ArtifactError, check_output_path,
                       fingerprint, make_output_tmpdir, move_into_place, output_umask)

log = logging.getLogger(__name__)

QUANT_METHOD = "accel"
# Version of the checkpoint layout (leaf names, the "accel.<method>.<name>" global tensors).
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
GLOBAL_PREFIX = "accel."
# Leaf under which a module's dense weight is stored when accel's runtime needs it (pruned,
# R-Sparse, identity linears; the q/k projections Double Sparsity reads its channels from), with an
# empty `weight` at the standard key: transformers without accel then stops on that shape (after
# naming the unknown "accel" quantization) instead of loading a model without its method.
HIDDEN = "accel_weight"


def check_serializable(configs) -> None:
    """Raise ArtifactError naming the first method that cannot be saved as an HF checkpoint."""
    from .patches.core import checkpoint_format

    for cfg in configs:
        if checkpoint_format(cfg.method) is None:
            raise ArtifactError(f"cannot save this model as an HF checkpoint: method {cfg.method!r} has no checkpoint "
                                f"format (register one with accel.patches.core.register_checkpoint); save its "
                                f"artifact instead (Artifact.save)")


def _state(model):
    from .patches.core import state_of

    state = state_of(model)
    if state is None or not state.methods:
        raise ArtifactError(f"{type(model).__name__} is not patched by accel: nothing accel-specific to save "
                            f"(model.save_pretrained writes the dense model)")
    return state


def checkpoint_state_dict(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of the checkpoint of patched `model` (see module doc).

    Also records the model's fingerprint in its quantization_config (config.json is written after)."""
    from .patches.core import checkpoint_format

    state = _state(model)
    check_serializable(state.methods)
    sd = dict(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for cfg in state.methods:
        fmt = checkpoint_format(cfg.method)
        if fmt.kind == "global":
            for k, v in fmt.export(model, state, cfg).items():
                out[f"{GLOBAL_PREFIX}{cfg.method}.{k}"] = v.detach()
        elif fmt.kind == "linear":
            for row in state.rows:
                if row.method != cfg.method or row.kind != "linear":
                    continue
                prefix = row.module + "."
                for k in [k for k in sd if k.startswith(prefix) and "." not in k[len(prefix):]]:
                    del sd[k]
                for leaf, v in fmt.export(row.target).items():
                    out[prefix + leaf] = v.detach()
    sd.update(out)
    _hide_dense_weights(model, state, sd)
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and hasattr(qc, "fingerprint"):
        qc.fingerprint = fingerprint(model)
    return sd, {"accel_format_version": str(FORMAT_VERSION)}


def _hide_dense_weights(model, state, sd: dict[str, torch.Tensor]) -> None:
    """Move each patched module's dense weight to `<module>.accel_weight`, leaving an empty
    `<module>.weight` (see HIDDEN): every linear a method swapped, and the q/k projections of
    every attention layer a method replaced (Double Sparsity selects their channels)."""
    names = []
    for row in state.rows:
        if row.kind == "linear":
            names.append(row.module)
        elif row.kind == "attention":
            names += [f"{row.module}.{p}" for p in ("q_proj", "k_proj")]
    for name in dict.fromkeys(names):
        t = sd.get(name + ".weight")
        if isinstance(t, torch.Tensor) and t.numel():
            sd[f"{name}.{HIDDEN}"] = t
            sd[name + ".weight"] = torch.zeros(0, dtype=torch.uint8)


def _card(model, state, calibration: dict | None, metrics: dict | None, files: dict[str, int]) -> str:
    from ._version import __version__

    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    methods = [c.method for c in state.methods]
    lines = ["---", "library_name: transformers", "tags:", "- accel"] + [f"- {m}" for m in methods] + ["---", "",
             f"# {arch} compressed with accel ({' + '.join(methods)})", "",
             f"Written by accel {__version__}. Load it after `import accel` (a quantization method of transformers):",
             "", "```python", "import accel", "from transformers import AutoModelForCausalLM",
             "model = AutoModelForCausalLM.from_pretrained(\"<this directory>\")", "```", "",
             "Without accel, transformers warns `Unknown quantization type, got accel` and stops on a size "
             "mismatch (accel stores the patched modules' tensors under its own names).", "",
             "## Methods (in patch order)", "", "| method | version | settings |", "|---|---|---|"]
    for c in state.methods:
        d = c.to_dict()
        params = ", ".join(f"{k}={v}" for k, v in sorted(d.get("params", {}).items()))
        lines.append(f"| {c.method} | {d.get('version')} | {params} |")
    if calibration:
        lines += ["", "## Calibration", ""] + [f"- {k}: {v}" for k, v in sorted(calibration.items())]
    lines += ["", "## Measured accuracy", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(metrics.items())] if metrics else ["Not measured for this checkpoint."]
    lines += ["", "## Files", ""] + [f"- {n}: {b:,} bytes" for n, b in sorted(files.items())]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def session_keys_off(config):
    """Take accel.models.load's `accel_*` config keys (accel_source, accel_bos_token_id) off
    `config` for the block, then put them back. They say how this process loaded the model (read
    by calibration, perplexity, lm-eval): written to config.json, a later load would trust them.
    transformers serialises every key of config.__dict__, so they must be absent while it writes
    (accel.save_pretrained, and a patched model's plain save_pretrained: patches/hf_quantizer.py)."""
    d = config.__dict__
    session = {k: d.pop(k) for k in list(d) if k.startswith("accel_")}
    try:
        yield session
    finally:
        d.update(session)


def save_pretrained(model, path: str | os.PathLike, *, tokenizer=None, overwrite: bool = False,
                    metrics: dict | None = None, calibration: dict | None = None,
                    max_shard_size: str | int | None = None) -> Path:
    """Write patched `model` to directory `path` as an HF checkpoint that, after `import accel`,
    `AutoModelForCausalLM.from_pretrained(path)` (and `pipeline(...)`) loads patched.

    tokenizer: saved beside it when given. metrics / calibration: shown in the model card (e.g.
    {"wiki ppl": 12.8}). Written into a temp dir renamed into place; `path` must not exist, be
    empty, or hold an earlier accel HF checkpoint (replaced only with overwrite=True). Raises
    ArtifactError naming a method that cannot be saved, before anything is written."""
    path = check_output_path(path, overwrite, "hf")
    state = _state(model)
    check_serializable(state.methods)
    q = model.__dict__.get("hf_quantizer")
    if getattr(getattr(q, "quantization_config", None), "quant_method", None) != QUANT_METHOD:
        raise ArtifactError(f"{type(model).__name__} carries another quantization "
                            f"({type(getattr(model, 'hf_quantizer', None)).__name__}); accel cannot save it")
    tmp = make_output_tmpdir(path)
    try:
        kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        with session_keys_off(model.config):
            model.save_pretrained(tmp, **kw)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.suffix == ".safetensors"}
        (tmp / "README.md").write_text(_card(model, state, calibration, metrics, files))
        names = sorted(p.name for p in tmp.iterdir())
        (tmp / HF_EXPORT_MARKER).write_text(json.dumps({"format": HF_EXPORT_FORMAT, "kind": "accel-checkpoint",
                                                        "files": names}))
        # safetensors and some writers create 0600 files whatever the umask; give them the umask's mode.
        mode = 0o666 & ~output_umask(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                os.chmod(p, mode)
        move_into_place(tmp, path, overwrite, "hf")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote accel HF checkpoint %s (%s)", path, ", ".join(c.method for c in state.methods))
    return path


def base_model_for(art: Artifact, model=None, tokenizer=None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) an export applies `art` to: the one given (loaded, or a name/path the
    user chose), else the model the artifact records only if accel ships it (smollm2-135m,
    tiny-*): an artifact never makes accel load a hub name or local path of its choosing."""
    from .models import SMOLLM2_NAMES

    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = _load_source(str(model), dtype)
    elif model is None:
        source = art.calibration.get("model")
        if not (isinstance(source, str) and (source.startswith("tiny-") or source.lower() in SMOLLM2_NAMES)):
            raise ArtifactError(f"{art.path}: the artifact names its base model {source!r}; accel does not load "
                                f"a model an artifact chooses: pass it yourself (--model MODEL, model=...)")
        model, tokenizer = _load_source(source, dtype)
    art.check_model(model)
    return model, tokenizer


def _load_source(source: str, dtype):
    from . import models

    if source.startswith("tiny-"):
        return models.tiny(source[len("tiny-"):], dtype=dtype), None
    return models.load(source, dtype=dtype)


def export_checkpoint(artifact, output: str | os.PathLike, model=None, tokenizer=None, *, overwrite: bool = False,
                      dtype: torch.dtype = torch.bfloat16, metrics: dict | None = None) -> Path:
    """`accel export --format hf`: the base model patched with `artifact` (any methods, several in
    one artifact too), saved with `save_pretrained`. model: see `base_model_for`; dtype: the
    checkpoint's float dtype when accel loads the model (bfloat16, the usual sharing dtype)."""
    from .patches.core import patch

    output = check_output_path(output, overwrite, "hf")
    art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    check_serializable(art.configs)
    # Loaded as the artifact's fingerprint was taken (float32; a seeded tiny model initialised in
    # bfloat16 would be another model), then cast for the checkpoint.
    model, tokenizer = base_model_for(art, model, tokenizer)
    if dtype is not None:
        model = model.to(dtype)
    patch(model, art)
    return save_pretrained(model, output, tokenizer=tokenizer, overwrite=overwrite, metrics=metrics,
                           calibration=art.calibration)


def _export_cli(artifact: str, output: str, model: str | None = None, overwrite: bool = False) -> Path:
    return export_checkpoint(artifact, output, model=model, overwrite=overwrite)


def register(cli) -> None:
    cli.exporter("hf", _export_cli, "accel HF checkpoint (any methods, bfloat16): from_pretrained loads it patched "
                                    "after `import accel`")
