"""The artifact: a directory with `accel_config.json` (versioned JSON) and `*.safetensors`.

    DIR/accel_config.json   format version, method configs, calibration data description,
                            library versions, model fingerprint, and size + sha256 of each file
    DIR/tensors.safetensors tensors keyed "<method>/<name>"

Saving writes into a temp dir beside DIR and renames it into place, so a crash never leaves a
half-written artifact. Loading checks the JSON's field types, then sizes and hashes before
parsing, and only ever reads JSON and safetensors: nothing is unpickled.

Outputs: `check_output_path(path, overwrite, kind)` is the one rule every writer of a directory
or file output follows (Artifact.save, `accel export`, the calibrate commands before they start):
accel never replaces what it did not write. Files are created with the process umask.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .configs import ConfigError, MethodConfig, config_from_dict
from .errors import AccelError

log = logging.getLogger(__name__)

FORMAT = "accel-artifact"
FORMAT_VERSION = 1
CONFIG_NAME = "accel_config.json"
TENSORS_NAME = "tensors.safetensors"


class ArtifactError(RuntimeError, AccelError):
    """An artifact is missing, corrupt, truncated, of an unknown version, or for another model;
    or an output path accel refuses to write (see check_output_path)."""


# ---------------------------------------------------------------------------------------------
# Outputs: never replace what accel did not write
# ---------------------------------------------------------------------------------------------
# An accel hf export holds this manifest beside the HF files, so that --overwrite can tell it
# from a user's directory.
HF_EXPORT_MARKER = "accel_export.json"
HF_EXPORT_FORMAT = "accel-hf-export"
OUTPUT_KINDS = {"artifact": "an accel artifact", "hf": "an accel hf export", "file": "a file"}


def _accel_written(path: Path, kind: str) -> set[str] | None:
    """The entry names accel wrote in directory `path` as a `kind` output, read from its manifest
    (the manifest included); None when `path` holds no such manifest."""
    manifest = path / (CONFIG_NAME if kind == "artifact" else HF_EXPORT_MARKER)
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != (FORMAT if kind == "artifact" else HF_EXPORT_FORMAT):
        return None
    names = doc.get("files")
    names = list(names) if isinstance(names, (dict, list)) else []
    return {manifest.name} | {n for n in names if isinstance(n, str)}


def write_file(path: str | os.PathLike, write, overwrite: bool = False) -> Path:
    """Write one output file the user named (a plot, a JSON) the way every accel output is written:
    `check_output_path(path, overwrite, "file")`, then `write(tmp_path)` into a temp file beside it
    (mode from the umask), then a rename into place. Nothing is left behind on error."""
    path = check_output_path(path, overwrite, "file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600; a plain open() would have followed the umask.
        os.chmod(tmp, 0o666 & ~output_umask(path.parent))
        check_output_path(path, overwrite, "file")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def save_figure(fig, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """A matplotlib figure as a PNG through `write_file` (checked, atomic); closes the figure."""
    import matplotlib.pyplot as plt

    try:
        return write_file(path, lambda tmp: fig.savefig(tmp, dpi=120), overwrite)
    finally:
        plt.close(fig)


def check_output_path(path: str | os.PathLike, overwrite: bool = False, kind: str = "artifact") -> Path:
    """Raise ArtifactError unless accel may write a `kind` output at `path`; returns it as a Path.

    kind "artifact" or "hf" (a directory): nothing there, or an empty directory, is fine; a
    directory accel wrote as the same kind (its manifest lists every entry in it) needs
    `overwrite`; anything else (a file, a symlink, a directory holding anything accel did not
    write) is refused even with `overwrite`.
    kind "file" (e.g. an sglang-ds JSON): nothing there is fine, an existing regular file needs
    `overwrite` (the user named that very file), a directory or symlink is refused.
    Called before any work starts (fail fast) and again just before the rename into place."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"check_output_path: kind must be one of {sorted(OUTPUT_KINDS)}, got {kind!r}")
    path = Path(path)
    what = OUTPUT_KINDS[kind]
    for anc in path.parents:
        if os.path.lexists(anc):
            if not anc.is_dir():
                raise ArtifactError(f"cannot write {path}: {anc} is not a directory")
            break
    if path.is_symlink():
        raise ArtifactError(f"{path} is a symbolic link; refusing to write through it (choose another output)")
    if not path.exists():
        return path
    if kind == "file":
        if not path.is_file():
            raise ArtifactError(f"{path} exists and is not a regular file; refusing to replace it")
        if not overwrite:
            raise ArtifactError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
        return path
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file, not {what} directory; refusing to replace it "
                            f"(choose another output)")
    entries = {e.name for e in path.iterdir()}
    if not entries:
        return path
    ours = _accel_written(path, kind)
    if ours is None:
        other = [OUTPUT_KINDS[k] for k in ("artifact", "hf") if k != kind and _accel_written(path, k) is not None]
        raise ArtifactError(f"{path} is a non-empty directory that is not {what}"
                            + (f" (it is {other[0]})" if other else "")
                            + "; refusing to replace it, even with --overwrite (choose another output)")
    extra = sorted(entries - ours)
    if extra:
        raise ArtifactError(f"{path} holds {what} plus files accel did not write ({', '.join(extra[:5])}); "
                            f"refusing to replace it, even with --overwrite")
    if not overwrite:
        raise ArtifactError(f"{path} already holds {what}; pass --overwrite (overwrite=True) to replace it")
    return path


def output_umask(d: Path) -> int:
    """The process umask, read without changing it (os.umask would, for every thread): the mode
    a fresh directory gets inside `d`."""
    probe = Path(tempfile.mkdtemp(prefix=".umask-", dir=d))
    try:
        os.rmdir(probe)
        os.mkdir(probe, 0o777)
        return 0o777 & ~stat.S_IMODE(probe.stat().st_mode)
    finally:
        os.rmdir(probe)


def make_output_tmpdir(path: Path) -> Path:
    """A temp dir beside `path` to write an output into, with the mode the umask gives a new dir
    (mkdtemp makes it 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~output_umask(tmp))
    return tmp


def move_into_place(tmp: Path, path: Path, overwrite: bool, kind: str) -> Path:
    """Rename the finished temp dir `tmp` to `path`, replacing what is there only where
    check_output_path allows (checked again: a calibration may have run for hours)."""
    check_output_path(path, overwrite, kind)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


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
    emb = model.get_input_embeddings()
    # A packed embedding (GQSA embedding_bits) keeps these rows of the table it replaced.
    rows = getattr(emb, "fingerprint_rows", None)
    parts = [rows if rows is not None else emb.weight[:16]]
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

    from ._version import __version__

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
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the artifact directory `path`. An existing accel artifact there is replaced only
        with overwrite=True; anything else there is refused (see check_output_path)."""
        from safetensors.torch import save_file

        path = check_output_path(path, overwrite, "artifact")
        if not self.configs:
            raise ArtifactError(f"refusing to write {path}: an artifact needs at least one method config")
        tmp = make_output_tmpdir(path)
        try:
            files = {}
            if self.tensors:
                tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
                save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": FORMAT})
                # safetensors creates the file 0600 whatever the umask; give it the umask's mode.
                os.chmod(tmp / TENSORS_NAME, 0o666 & ~output_umask(tmp))
                files[TENSORS_NAME] = {"bytes": (tmp / TENSORS_NAME).stat().st_size,
                                       "sha256": _sha256(tmp / TENSORS_NAME)}
            doc = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "created": self.created,
                "methods": [c.to_dict() for c in self.configs], "calibration": self.calibration,
                "library_versions": self.versions, "model_fingerprint": self.fingerprint, "files": files,
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(doc, indent=2, sort_keys=False, default=str))
            move_into_place(tmp, path, overwrite, "artifact")
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
            raise ArtifactError(f"{path}: artifact format version {doc.get('format_version')!r} is not supported "
                                f"(this accel reads version {FORMAT_VERSION})")
        _check_doc(doc, cfg_path)
        configs = []
        for i, d in enumerate(doc["methods"]):
            try:
                configs.append(config_from_dict(d))
            except ConfigError as e:
                raise ArtifactError(f"{cfg_path}: methods[{i}]: {e}") from None
        tensors: dict[str, torch.Tensor] = {}
        for name, info in doc["files"].items():
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
        return cls(configs=configs, tensors=tensors, fingerprint=doc["model_fingerprint"],
                   calibration=doc.get("calibration", {}), versions=doc.get("library_versions", {}),
                   created=doc.get("created", ""), path=path)


def _check_doc(doc: dict, where: Path) -> None:
    """Types of the artifact document's own fields (method params are typed by their configs)."""
    def bad(name, want, got):
        raise ArtifactError(f"{where}: {name} must be {want}, got {got!r}")

    methods = doc.get("methods")
    if not isinstance(methods, list) or not methods:
        bad("methods", "a non-empty list of method configs", methods)
    for i, m in enumerate(methods):
        if not isinstance(m, dict):
            bad(f"methods[{i}]", "a dict with method, version and params", m)
    files = doc.get("files")
    if not isinstance(files, dict):
        bad("files", "a dict of file name -> {bytes, sha256}", files)
    for name, info in files.items():
        key = f"files[{name!r}]"
        if not isinstance(info, dict):
            bad(key, "a dict with bytes and sha256", info)
        n = info.get("bytes")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            bad(f"{key}.bytes", "a non-negative int", n)
        h = info.get("sha256")
        if not isinstance(h, str) or not re.fullmatch(r"[0-9a-f]{64}", h):
            bad(f"{key}.sha256", "64 lowercase hex digits", h)
    if not isinstance(doc.get("model_fingerprint"), dict):
        bad("model_fingerprint", "a dict", doc.get("model_fingerprint"))
    for name in ("calibration", "library_versions"):
        if not isinstance(doc.get(name, {}), dict):
            bad(name, "a dict", doc.get(name))
    if not isinstance(doc.get("created", ""), str):
        bad("created", "a string", doc.get("created"))
