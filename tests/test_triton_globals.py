"""Compiled Triton (unlike TRITON_INTERPRET=1, which CI uses) refuses @jit code that reads a
plain Python global; only tl.constexpr globals (and modules, jit functions, triton builtins, dtypes)
are allowed. Found on an H200 (DS's FLT_MAX). The modules are found by scanning the source tree
for files that import triton, so a new kernel file is checked without editing this test."""
import ast
import importlib
import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

ROOT = Path(__file__).resolve().parents[1]
# JITFunction when compiled, InterpretedFunction under TRITON_INTERPRET=1: both wrap the function in .fn.
JIT_TYPES = ("JITFunction", "InterpretedFunction")


def _imports_triton(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "triton" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "triton" and not node.level:
            return True
    return False


def triton_modules(root: Path = ROOT) -> list[str]:
    """Dotted names of every module under pyproject's package-dir folders that imports triton."""
    package_dir = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = set()
    for pkg, folder in package_dir.items():
        for path in sorted((root / folder).rglob("*.py")):
            if _imports_triton(path):
                rel = path.relative_to(root / folder).with_suffix("").parts
                found.add(".".join((pkg, *rel)))
    return sorted(found)


def _local_names(fn_node) -> set[str]:
    """Parameters and every name the function assigns: Triton looks these up before the globals."""
    a = fn_node.args
    names = {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg] if x is not None}
    return names | {n.id for n in ast.walk(fn_node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def _allowed_global(v) -> bool:
    # Mirrors triton/compiler/code_generator.py's global_lookup (3.x).
    return (isinstance(v, (ModuleType, tl.constexpr, tl.dtype)) or type(v).__name__ in JIT_TYPES
            or getattr(v, "__triton_builtin__", False) or getattr(v, "__triton_aggregate__", False)
            or getattr(v, "__module__", None) is not None and str(v.__module__).startswith("triton.language")
            or isinstance(v, tuple) and hasattr(type(v), "_fields"))


def bad_globals(mod: ModuleType) -> list[str]:
    """One message per plain global a @triton.jit function of `mod` reads."""
    jitted = [v for v in vars(mod).values() if type(v).__name__ in JIT_TYPES and v.fn.__module__ == mod.__name__]
    assert jitted, f"{mod.__name__} imports triton but defines no @triton.jit function"
    # Parsed from the module's file and found by name (not inspect.getsource's line numbers).
    defs = {n.name: n for n in ast.walk(ast.parse(Path(mod.__file__).read_text()))
            if isinstance(n, ast.FunctionDef)}
    bad = []
    for fn in jitted:
        node = defs[fn.fn.__name__]
        local = _local_names(node)
        read = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        # Default values are evaluated by Python, not Triton: `BLOCK: tl.constexpr = GLOBAL` is fine.
        defaults = {n.id for d in [*node.args.defaults, *node.args.kw_defaults] if d is not None
                    for n in ast.walk(d) if isinstance(n, ast.Name)}
        for name in sorted(read - local - defaults):
            if name in vars(mod) and not _allowed_global(vars(mod)[name]):
                bad.append(f"{mod.__name__}.{fn.fn.__name__} reads the plain global {name} = "
                           f"{vars(mod)[name]!r}; make it tl.constexpr")
    return bad


MODULES = triton_modules()


def test_scan_finds_every_kernel_folder():
    kernels = sorted(f"accel.kernels.{p.parent.name}.triton_kernel"
                     for p in (ROOT / "accel" / "kernels").glob("*/triton_kernel.py"))
    assert kernels, "no accel/kernels/*/triton_kernel.py found"
    assert set(kernels) <= set(MODULES), f"not found by the scan: {set(kernels) - set(MODULES)}"


@pytest.mark.parametrize("name", MODULES)
def test_jit_functions_read_only_constexpr_globals(name):
    assert bad_globals(importlib.import_module(name)) == []


# ---- the check itself can fail: a new Triton file with a bad global ---------------------------
NEW_KERNEL = '''
import triton
import triton.language as tl

SCALE = 2.0                        # plain float: compiled Triton refuses it
OK = tl.constexpr(3.0)


@triton.jit
def _helper(x):
    return x * OK


@triton.jit
def _scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    SCALE_LOCAL = 1.0
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, _helper(x) * SCALE * SCALE_LOCAL, mask=offs < n)
'''


def test_new_triton_file_with_plain_global_fails(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools]\npackage-dir = { "toypkg" = "src" }\n')
    (tmp_path / "src" / "kernels").mkdir(parents=True)
    (tmp_path / "src" / "__init__.py").write_text("")
    (tmp_path / "src" / "kernels" / "__init__.py").write_text("")
    (tmp_path / "src" / "kernels" / "plain.py").write_text("import torch\nX = 1.0\n")
    path = tmp_path / "src" / "kernels" / "new_kernel.py"
    path.write_text(NEW_KERNEL)
    assert triton_modules(tmp_path) == ["toypkg.kernels.new_kernel"]

    # Imported from a file (inspect.getsource needs one), under the scanned name.
    spec = importlib.util.spec_from_file_location("toypkg.kernels.new_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    assert bad_globals(mod) == ["toypkg.kernels.new_kernel._scale_kernel reads the plain global SCALE = 2.0; "
                                "make it tl.constexpr"]
