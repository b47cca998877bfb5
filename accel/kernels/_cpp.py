"""Optional native CPU kernels, built on first use with `torch.utils.cpp_extension.load_inline`.

Each kernel module registers its source under a name; `load(name, ...)` builds it once per
process (torch caches the binary across processes, ~30–60 s the first time on a machine) and
returns the extension module, or None when it cannot be had: ACCEL_CPP=0, no C++ compiler, or a
failed build. Callers then keep their exact torch path, so the native code is only ever a speed-up.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_lock = threading.Lock()
_mods: dict[str, object] = {}


def _cpu_tag() -> str:
    """A short hash of this CPU's feature flags: builds use -march=native, and torch's extension
    cache (shared home directories, containers moved between hosts) must not hand the binary to a
    CPU that lacks those instructions."""
    import hashlib
    import platform

    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def load(name: str, source: str | Path, functions: list[str], what: str, extra_cflags: tuple[str, ...] = ()):
    """The built extension `accel_<name>` exporting `functions`, or None (logged once, with `what`
    naming the fallback the caller keeps). `source`: C++ text, or a file read only when building.
    extra_cflags: more compiler flags. Every build gets -fopenmp: at::parallel_for is a header
    template whose `#pragma omp parallel` is compiled out without it, and every kernel then ran on
    one thread whatever torch.get_num_threads() said."""
    if name in _mods:
        return _mods[name]
    with _lock:
        if name in _mods:
            return _mods[name]
        mod = None
        if os.environ.get("ACCEL_CPP", "1") == "0":
            log.info("C++ kernel %s disabled by ACCEL_CPP=0; %s", name, what)
        elif shutil.which(os.environ.get("CXX", "c++")) is None:
            log.info("no C++ compiler found for kernel %s; %s", name, what)
        else:
            try:
                from torch.utils.cpp_extension import load_inline

                log.info("building the C++ kernel %s (once per machine)", name)
                text = source.read_text() if isinstance(source, Path) else source
                mod = load_inline(name=f"accel_{name}_{_cpu_tag()}", cpp_sources=[text], functions=functions,
                                  extra_cflags=["-O3", "-march=native", "-fopenmp", *extra_cflags],
                                  verbose=False)
            except Exception as e:  # any build failure leaves the caller's torch path in place
                log.warning("C++ kernel %s failed to build (%s); %s", name,
                            str(e).splitlines()[0] if str(e) else type(e).__name__, what)
        _mods[name] = mod
    return mod
