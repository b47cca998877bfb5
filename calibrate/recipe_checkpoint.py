"""Recipe checkpoints: one sub-directory per stage of a recipe (calibrate/recipe.py), so an
interrupted recipe resumes per stage. The layer checkpoints inside a stage are calibrate/checkpoint.py's.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

import torch

from .checkpoint import _WHAT, KEY_FORMAT, _fsync_replace, _tensors_sha, remove_checkpoints, samples_digest
from .errors import CalibrationError

log = logging.getLogger(__name__)

#   DIR/stage_XX/stage_key.json   what the stage is valid for: the dense model's weights, the
#                                 stage's calibration data, its config, the accel version, and
#                                 the tensors of every earlier stage (the model it was fitted on)
#   DIR/stage_XX/artifact/        the finished stage's artifact (written when the stage ends)
#   DIR/stage_XX/layers/          the running stage's own checkpoints (its calibrator's checkpoint_dir)
STAGE_KEY = "stage_key.json"
_STAGE = re.compile(r"stage_(\d{2,})")
_STAGE_OURS = re.compile(r"stage_key\.json(\.tmp)?")
# Artifact.save's temp and old dirs beside `artifact/`, which a kill may leave behind.
_STAGE_TMP = re.compile(r"\.artifact\.(tmp|old)-[\w-]+")
_STAGE_SUBDIRS = ("artifact", "layers")
_ARTIFACT_FILES = ("accel_config.json", "tensors.safetensors")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors (an earlier stage's artifact tensors, in a later stage's key)."""
    return _tensors_sha(tensors)


def stage_key(model_fp: dict, weights: str, samples: torch.Tensor | None, config: dict,
              earlier: list[dict]) -> dict:
    """The key of one recipe stage. earlier: per earlier stage {"config", "tensors"} (a digest)."""
    from accel._version import __version__

    key = {"format": KEY_FORMAT, "accel": __version__, "model": model_fp, "weights": weights,
           "data": samples_digest(samples) if samples is not None else None, "config": config, "earlier": earlier}
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _remove_artifact_dir(d: Path) -> None:
    if not d.is_dir():
        return
    for n in _ARTIFACT_FILES:
        if (d / n).is_file():
            (d / n).unlink()
    try:
        d.rmdir()
    except OSError:
        log.warning("left %s in place: it holds files accel did not write", d)


def _stage_foreign(d: Path) -> list[str]:
    bad = []
    for p in d.iterdir():
        if p.name in _STAGE_SUBDIRS or _STAGE_TMP.fullmatch(p.name):
            if not p.is_dir() or p.is_symlink():
                bad.append(p.name)
        elif not (p.is_file() and _STAGE_OURS.fullmatch(p.name)):
            bad.append(p.name)
    art = d / "artifact"
    if art.is_dir() and not art.is_symlink():
        bad += [f"artifact/{p.name}" for p in art.iterdir() if not (p.is_file() and p.name in _ARTIFACT_FILES)]
    return bad


class StageCheckpoint:
    """One recipe stage's directory (see above). Use `RecipeCheckpoints.stage`."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key = path, key
        self.layers = path / "layers"
        self._existed = path.is_dir()

    def _read_key(self) -> dict | None:
        try:
            doc = json.loads((self.path / STAGE_KEY).read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def open(self) -> "StageCheckpoint":
        """Clear a directory made for another key (named in the log), then write this key."""
        if self.path.is_dir():
            old = self._read_key()
            if old is not None and old != self.key:
                diffs = [_WHAT.get(k, k) for k in sorted(set(old) | set(self.key)) if old.get(k) != self.key.get(k)]
                log.warning("recipe checkpoints in %s were made with a different %s; starting this stage fresh",
                            self.path, ", ".join(d if d != "earlier" else "earlier stage" for d in diffs))
                self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / (STAGE_KEY + ".tmp")
        tmp.write_text(json.dumps(self.key, sort_keys=True, indent=1))
        _fsync_replace(tmp, self.path / STAGE_KEY)
        return self

    def finished(self):
        """The stage's saved artifact if it finished under this key, else None."""
        from accel.artifact import Artifact, ArtifactError

        if self._read_key() != self.key or not (self.path / "artifact" / _ARTIFACT_FILES[0]).is_file():
            return None
        try:
            return Artifact.load(self.path / "artifact")
        except (ArtifactError, OSError) as e:
            log.warning("stage artifact %s is unreadable (%s); recomputing the stage", self.path / "artifact", e)
            return None

    def finish(self, art) -> None:
        """Keep the stage's artifact (a copy: `art.path` is left alone), drop its layer checkpoints."""
        import copy

        out = self.path / "artifact"
        copy.copy(art).save(out, overwrite=True)
        remove_checkpoints(self.layers)

    def clear(self) -> None:
        import shutil

        remove_checkpoints(self.layers)
        for p in self.path.glob(".artifact.*"):
            if _STAGE_TMP.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
        _remove_artifact_dir(self.path / "artifact")
        for n in (STAGE_KEY, STAGE_KEY + ".tmp"):
            if (self.path / n).is_file():
                (self.path / n).unlink()

    def discard_new(self) -> None:
        """Forget a stage this run created (its calibration failed on bad data: a resume cannot help)."""
        if not self._existed:
            self.clear()
            with contextlib.suppress(OSError):
                self.path.rmdir()


class RecipeCheckpoints:
    """A recipe's checkpoint directory: `stage_XX/` sub-directories and nothing else."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise CalibrationError(f"checkpoint directory {self.path} is an existing file, not a directory; "
                                   f"choose another checkpoint directory")
        if self.path.is_dir():
            foreign = []
            for p in sorted(self.path.iterdir()):
                if not (_STAGE.fullmatch(p.name) and p.is_dir() and not p.is_symlink()):
                    foreign.append(p.name)
                else:
                    foreign += [f"{p.name}/{n}" for n in _stage_foreign(p)]
            if foreign:
                raise CalibrationError(
                    f"{self.path} is not an accel recipe checkpoint directory: it holds {', '.join(foreign[:3])}"
                    + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                    + "; accel never deletes files it did not write, so choose another checkpoint directory")
        self.user_dir = self.path.is_dir() and not any(self.path.iterdir())

    def stage(self, i: int, key: dict) -> StageCheckpoint:
        return StageCheckpoint(self.path / f"stage_{i:02d}", key)

    def remove(self) -> None:
        """Delete every stage's files, then the directory (kept when the user made it empty)."""
        if not self.path.is_dir():
            return
        for p in self.path.iterdir():
            if _STAGE.fullmatch(p.name) and p.is_dir():
                st = StageCheckpoint(p, {})
                st.clear()
                with contextlib.suppress(OSError):
                    p.rmdir()
        if not self.user_dir:
            with contextlib.suppress(OSError):
                self.path.rmdir()
