"""Per-layer calibration checkpoints, tied to what produced them.

    DIR/run_key.json            the key: accel version, model fingerprint + a hash of every
                                weight, a hash of the calibration token ids, the method's config
    DIR/layer_XXX.safetensors   one layer's results; metadata: the key's digest, the layer index,
                                and a sha256 of the tensor bytes

A directory whose key differs (another model, other data, other settings, another accel) is
emptied of accel's files and the run starts fresh, with a warning naming what differs. A layer
file that is truncated, corrupt or from another key is named in the log and recomputed. A
directory holding anything accel does not write is refused (CalibrationError), never deleted.
Every file is written to a temp name and renamed into place, so a kill leaves either the old
file or the new one. A recipe's directory holds one `stage_XX/` per stage instead (see
"Recipes" below: the finished stage's artifact and the running stage's layer checkpoints).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

from .errors import CalibrationError

log = logging.getLogger(__name__)

KEY_NAME = "run_key.json"
KEY_FORMAT = 2
_LAYER = re.compile(r"layer_(\d{3,})\.safetensors")
# Names accel writes (layer files, the key) and its temp files, which a kill may leave behind.
_OURS = re.compile(r"(layer_\d{3,}\.safetensors|run_key\.json)(\.tmp(-\d+)?)?|layer_\d{3,}\.tmp")
# What a key mismatch is reported as, per key field.
_WHAT = {"model": "model (fingerprint)", "weights": "model weights", "data": "calibration data",
         "config": "config", "accel": "accel version", "format": "checkpoint format"}


def _digest_bytes(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(f"{t.dtype}:{t.numel()}:".encode())
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).numpy()))


def weights_digest(model) -> str:
    """sha256 over every parameter (name, dtype, shape, bytes): two models that differ in any
    weight get different checkpoint keys (the artifact fingerprint hashes only a few tensors)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        h.update(f"{name}{tuple(p.shape)}".encode())
        _digest_bytes(h, p)
    return h.hexdigest()


def samples_digest(samples: torch.Tensor) -> dict:
    h = hashlib.sha256()
    _digest_bytes(h, samples.to(torch.int64))
    return {"shape": list(samples.shape), "sha256": h.hexdigest()}


def checkpoint_key(model, samples: torch.Tensor, run_key: dict | None, weights: str | None = None) -> dict:
    """What a checkpoint is valid for. `run_key`: the method's settings (config, batch size...).
    `weights`: weights_digest(model) when the caller has it already (hashing every weight costs
    a pass over the whole model, so a run that keys several checkpoints computes it once)."""
    from accel._version import __version__
    from accel.artifact import fingerprint

    key = {"format": KEY_FORMAT, "accel": __version__, "model": fingerprint(model),
           "weights": weights if weights is not None else weights_digest(model),
           "data": samples_digest(samples), "config": run_key or {}}
    # Round-trip through JSON so that comparing with a key read back from disk is exact.
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _tensors_sha(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        _digest_bytes(h, tensors[k])
    return h.hexdigest()


def _fsync_replace(tmp: Path, dest: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def refuse_foreign(path: Path, names: list[str] | None = None, *, extra: re.Pattern | None = None,
                   subdirs: tuple[str, ...] = ()) -> None:
    """CalibrationError if directory `path` holds anything accel does not write there: its
    checkpoint files (plus files matching `extra` and the sub-directories `subdirs`)."""
    if names is None:
        names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def ours(n: str) -> bool:
        f = path / n
        if n in subdirs:
            return f.is_dir() and not f.is_symlink()
        return f.is_file() and bool(_OURS.fullmatch(n) or (extra is not None and extra.fullmatch(n)))

    foreign = [n for n in names if not ours(n)]
    if foreign:
        raise CalibrationError(
            f"{path} is not an accel checkpoint directory: it holds {', '.join(foreign[:3])}"
            + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            + "; accel never deletes files it did not write, so choose another checkpoint directory")


class CheckpointDir:
    """One run's checkpoint directory (see the module docstring). Use `open`."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key = path, key
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    @classmethod
    def open(cls, path: str | os.PathLike, key: dict) -> "CheckpointDir":
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise CalibrationError(f"checkpoint directory {path} is an existing file, not a directory; "
                                   f"choose another checkpoint directory")
        if path.is_dir():
            names = sorted(p.name for p in path.iterdir())
            refuse_foreign(path, names)
            if names:
                old = cls._read_key(path)
                if old is None and any(_LAYER.fullmatch(n) for n in names):
                    raise CalibrationError(f"{path} holds layer checkpoints but no readable {KEY_NAME}; they "
                                           f"cannot be matched to a model: delete them or choose another directory")
                stale = old != key
                if stale and old is not None:
                    diffs = [_WHAT.get(k, k) for k in sorted(set(old) | set(key)) if old.get(k) != key.get(k)]
                    log.warning("checkpoints in %s were made with a different %s; starting fresh (discarding "
                                "them)", path, ", ".join(diffs))
                for n in names:
                    # Temps are half-written leftovers of a kill; layers of another key are useless.
                    if n != KEY_NAME and (stale or not _LAYER.fullmatch(n)):
                        (path / n).unlink()
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / (KEY_NAME + ".tmp")
        tmp.write_text(json.dumps(key, sort_keys=True, indent=1))
        _fsync_replace(tmp, path / KEY_NAME)
        return cls(path, key)

    @staticmethod
    def _read_key(path: Path) -> dict | None:
        try:
            doc = json.loads((path / KEY_NAME).read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            log.warning("%s is unreadable; treating its checkpoints as another run's", path / KEY_NAME)
            return {}
        return doc if isinstance(doc, dict) else {}

    def file(self, i: int) -> Path:
        return self.path / f"layer_{i:03d}.safetensors"

    def has(self, i: int) -> bool:
        return self.file(i).is_file()

    def load(self, i: int) -> dict[str, torch.Tensor] | None:
        """Layer i's tensors, or None if it has no checkpoint or a bad one (logged by name)."""
        from safetensors import safe_open

        f = self.file(i)
        if not f.is_file():
            return None
        try:
            with safe_open(str(f), framework="pt") as st:
                meta = st.metadata() or {}
                tensors = {k: st.get_tensor(k) for k in st.keys()}
        except Exception as e:  # SafetensorError, OSError...: any unreadable file is recomputed
            log.warning("layer checkpoint %s is unreadable (%s: %s); recomputing from layer %d",
                        f, type(e).__name__, str(e)[:200], i)
            return None
        if meta.get("accel_key") != self.digest or meta.get("layer") != str(i):
            log.warning("layer checkpoint %s belongs to another run or layer; recomputing from layer %d", f, i)
            return None
        if meta.get("sha256") != _tensors_sha(tensors):
            log.warning("layer checkpoint %s is corrupt (its tensors do not match their sha256); "
                        "recomputing from layer %d", f, i)
            return None
        return tensors

    def save(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()}
        f = self.file(i)
        tmp = f.with_name(f.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"accel_key": self.digest, "layer": str(i),
                                               "sha256": _tensors_sha(tensors)})
        _fsync_replace(tmp, f)

    def discard_from(self, i: int) -> None:
        """Remove the layer files from layer i on: computed from inputs the recomputation replaces."""
        for p in self.path.iterdir():
            m = _LAYER.fullmatch(p.name)
            if m and int(m.group(1)) >= i:
                p.unlink()


# Other files accel's calibrators write into a checkpoint directory: R-Sparse's evolutionary
# search state (and its temp file), and the sub-directory of its statistics pass.
_EXTRA = re.compile(r"evo_[a-z]+_[0-9.]+_[0-9.]+\.(json|tmp)")
_SUBDIRS = ("stats",)


def refuse_foreign_top(path: str | os.PathLike) -> None:
    """refuse_foreign for a calibrator's top-level checkpoint directory (which may also hold
    R-Sparse's search state and its `stats/` sub-directory)."""
    refuse_foreign(Path(path), extra=_EXTRA, subdirs=_SUBDIRS)


def remove_checkpoints(path: str | os.PathLike, keep_dir: bool = False) -> None:
    """Delete accel's checkpoint files in `path` (and in its `stats/` sub-directory), then the
    directories that this leaves empty, except `path` itself when `keep_dir` (a directory the
    user made: accel removes only directories it created or filled with its checkpoints).
    Anything else in them stays (accel does not delete files it did not write)."""
    path = Path(path)
    if not path.is_dir():
        return
    for sub in _SUBDIRS:
        if (path / sub).is_dir() and not (path / sub).is_symlink():
            remove_checkpoints(path / sub)
    for p in path.iterdir():
        if (_OURS.fullmatch(p.name) or _EXTRA.fullmatch(p.name)) and p.is_file():
            p.unlink()
    if keep_dir:
        return
    try:
        path.rmdir()
    except OSError:
        log.warning("left %s in place: it holds files accel did not write", path)


def resolve_checkpoint_dir(out: Path | None, checkpoint_dir, prefix: str) -> tuple[Path | None, bool]:
    """Where a calibration checkpoints, and whether accel made that directory (so removes it):
    `checkpoint_dir` None -> OUTPUT.partial beside the output, or a fresh temp dir without one;
    False -> none; a path -> that path."""
    if checkpoint_dir is None:
        if out is not None:
            return out.with_name(out.name + ".partial"), False
        return Path(tempfile.mkdtemp(prefix=prefix)), True
    return (None if checkpoint_dir is False else Path(checkpoint_dir)), False
