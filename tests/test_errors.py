"""Every error class accel defines for bad input is an AccelError, so the CLI prints it as one
line with exit code 2 and `except accel.AccelError` catches it."""
import ast
import importlib
import pathlib

import pytest

import accel
from accel.errors import AccelError

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"accel": "accel", "patches": "accel.patches", "calibrate": "accel.calibrate", "eval": "accel.eval"}


def _error_classes():
    for folder, pkg in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.parse(f.read_text()).body:
                if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and node.name != "AccelError":
                    rel = f.relative_to(ROOT / folder).with_suffix("")
                    mod = ".".join([pkg, *rel.parts]).removesuffix(".__init__")
                    yield pytest.param(mod, node.name, id=f"{mod}.{node.name}")


CASES = list(_error_classes())


def test_the_scan_finds_the_known_errors():
    names = {c.values[1] for c in CASES}
    assert {"ConfigError", "ArtifactError", "CalibrationError", "UnsupportedModelError", "DataError",
            "PatchConflictError", "TargetError", "GQSAFormatError", "OffloadError", "PatternError"} <= names


@pytest.mark.parametrize("mod,name", CASES)
def test_error_class_is_an_accel_error(mod, name):
    cls = getattr(importlib.import_module(mod), name)
    assert issubclass(cls, AccelError), f"{mod}.{name} does not subclass accel.errors.AccelError"


def test_sglang_json_follows_the_umask(tmp_path):
    import os
    import stat

    import torch

    from accel.calibrate.double_sparsity import write_sglang_json

    old = os.umask(0o077)
    try:
        scores = {f"scores_{k}": torch.rand(2, 3, 8) for k in ("qk", "q", "k")}
        out = write_sglang_json(scores, tmp_path / "ds.json")
    except Exception:
        os.umask(old)
        raise
    os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
