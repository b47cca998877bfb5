"""The artifact: a directory with `accel_config.json` (versioned JSON) and `*.safetensors`.

    DIR/accel_config.json   format version, method configs, calibration data description,
                            library versions, model fingerprint, and size + sha256 of each file
    DIR/tensors.safetensors tensors keyed "<method>/<name>"

Saving writes into a temp dir beside DIR and renames it into place, so a crash never leaves a
half-written artifact. Loading checks sizes and hashes before parsing, and only ever reads JSON
and safetensors: nothing is unpickled.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .configs import ConfigError, MethodConfig, config_from_dict

log = logging.getLogger(__name__)

FORMAT = "accel-artifact"
FORMAT_VERSION = 1
CONFIG_NAME = "accel_config.json"
TENSORS_NAME = "tensors.safetensors"


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, truncated, of an unknown version, or for another model."""


# ---------------------------------------------------------------------------------------------
# Model fingerprint
# ---------------------------------------------------------------------------------------------
_FP_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _weights_hash(model) -> str:
    # Embedding rows and norm weights: no accel method modifies them, so the hash identifies the
    # model before and after patching. bf16 rounding makes fp32 and bf16 loads of one checkpoint agree.
    h = hashlib.sha256()
    parts = [model.get_input_embeddings().weight[:16]]
    parts += [p for n, p in model.named_parameters() if n.endswith("norm.weight")][:4]
    for t in parts:
        h.update(t.detach().to("cpu", torch.bfloat16).float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(model) -> dict[str, Any]:
    cfg = _text_config(model.config)
    fp = {k: getattr(cfg, k, None) for k in _FP_KEYS}
    if fp["head_dim"] is None and fp["hidden_size"] and fp["num_attention_heads"]:
        fp["head_dim"] = fp["hidden_size"] // fp["num_attention_heads"]
    fp["architectures"] = list(getattr(model.config, "architectures", None) or [type(model).__name__])
    fp["weights_sha256"] = _weights_hash(model)
    return fp


def check_fingerprint(expected: dict[str, Any], model, what: str = "artifact") -> None:
    actual = fingerprint(model)
    diffs = [f"{k}: {what} has {expected.get(k)!r}, model has {actual.get(k)!r}"
             for k in list(_FP_KEYS) + ["weights_sha256"] if expected.get(k) != actual.get(k)]
    if diffs:
        raise ArtifactError(f"this {what} was made for a different model:\n  " + "\n  ".join(diffs))


# ---------------------------------------------------------------------------------------------
# Artifact
# ---------------------------------------------------------------------------------------------
def library_versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"accel": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Artifact:
    configs: list[MethodConfig]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())
    path: Path | None = None

    @classmethod
    def for_model(cls, model, configs, tensors=None, calibration=None) -> "Artifact":
        configs = list(configs) if isinstance(configs, (list, tuple)) else [configs]
        return cls(configs=configs, tensors=dict(tensors or {}), fingerprint=fingerprint(model),
                   calibration=dict(calibration or {}))

    def tensors_for(self, method: str) -> dict[str, torch.Tensor]:
        """This method's tensors, with the "<method>/" prefix removed."""
        prefix = method + "/"
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def check_model(self, model) -> None:
        check_fingerprint(self.fingerprint, model)

    # -- saving ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise ArtifactError(f"{path} exists; pass overwrite=True to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        os.chmod(tmp, 0o755)
        try:
            files = {}
            if self.tensors:
                tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
                save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": FORMAT})
                files[TENSORS_NAME] = {"bytes": (tmp / TENSORS_NAME).stat().st_size,
                                       "sha256": _sha256(tmp / TENSORS_NAME)}
            doc = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "created": self.created,
                "methods": [c.to_dict() for c in self.configs], "calibration": self.calibration,
                "library_versions": self.versions, "model_fingerprint": self.fingerprint, "files": files,
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(doc, indent=2, sort_keys=False, default=str))
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.rename(path, old)
            os.rename(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = path
        log.info("wrote artifact %s (%d tensors)", path, len(self.tensors))
        return path

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Artifact":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path = path / CONFIG_NAME
        if not cfg_path.is_file():
            raise ArtifactError(f"{path} is not an accel artifact: {CONFIG_NAME} is missing")
        try:
            doc = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{cfg_path} is corrupt: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ArtifactError(f"{cfg_path} is not an accel artifact config (format={doc.get('format')!r})"
                                if isinstance(doc, dict) else f"{cfg_path} is not an accel artifact config")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{path}: artifact format version {doc.get('format_version')} is not supported "
                                f"(this accel reads version {FORMAT_VERSION})")
        try:
            configs = [config_from_dict(d) for d in doc.get("methods", [])]
        except ConfigError as e:
            raise ArtifactError(f"{path}: {e}") from None
        tensors: dict[str, torch.Tensor] = {}
        for name, info in doc.get("files", {}).items():
            fpath = path / name
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise ArtifactError(f"{path}: refusing unexpected file entry {name!r}")
            if not fpath.is_file():
                raise ArtifactError(f"{path}: {name} is missing")
            size = fpath.stat().st_size
            if size != info.get("bytes"):
                raise ArtifactError(f"{fpath} is truncated or corrupt: {size} bytes on disk, "
                                    f"{info.get('bytes')} expected")
            if _sha256(fpath) != info.get("sha256"):
                raise ArtifactError(f"{fpath} is corrupt: its sha256 does not match {CONFIG_NAME}")
            try:
                tensors.update(load_file(str(fpath)))
            except (SafetensorError, OSError, ValueError) as e:
                raise ArtifactError(f"{fpath} is corrupt: {e}") from None
        return cls(configs=configs, tensors=tensors, fingerprint=doc.get("model_fingerprint", {}),
                   calibration=doc.get("calibration", {}), versions=doc.get("library_versions", {}),
                   created=doc.get("created", ""), path=path)
