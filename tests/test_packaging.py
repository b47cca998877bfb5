"""Every Python package folder is listed in pyproject.toml, so normal (non-editable) installs
ship it too."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = set()
    for pkg, folder in cfg["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found - listed == set(), f"add these to pyproject's packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed but missing: {sorted(listed - found)}"


def test_every_data_file_is_package_data():
    """Non-Python files the code reads (task YAMLs, the GQSA C++ source) must match a
    package-data pattern, or a wheel install would lack them."""
    import fnmatch

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = cfg.get("package-data", {})
    dirs = cfg["package-dir"]
    missing = []
    for pkg in cfg["packages"]:
        # The longest package-dir entry that is this package or a parent of it.
        base = max((k for k in dirs if pkg == k or pkg.startswith(k + ".")), key=len)
        folder = ROOT / dirs[base]
        if pkg != base:
            folder = folder.joinpath(*pkg[len(base) + 1:].split("."))
        for f in folder.iterdir():
            if f.is_file() and f.suffix not in (".py", ".pyc") and not any(
                    fnmatch.fnmatch(f.name, pat) for pat in data.get(pkg, [])):
                missing.append(f"{pkg}: {f.name}")
    assert missing == [], f"add to [tool.setuptools.package-data]: {missing}"
