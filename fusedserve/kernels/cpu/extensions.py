"""Build and load the project's C++ CPU kernels on first use, through torch.utils.cpp_extension.

Each kernel is one .cpp file beside this module. The build goes into the fusedserve cache, keyed by a hash of
the source so an edited kernel rebuilds and later processes just load the library. A missing compiler or a
failed build is not fatal: `load_cpp_extension` returns None and callers keep their pure-torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

from fusedserve.engine.model.default_model import cache_root

DISABLE_ENV = "FUSEDSERVE_NO_CPP_KERNELS"  # 1: force the pure-torch paths (benchmarks, debugging)

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None


def load_cpp_extension(source_name: str) -> ModuleType | None:
    """The compiled module for `source_name` (a .cpp beside this file), or None where it cannot be had."""
    if os.environ.get(DISABLE_ENV) == "1":
        return None
    if source_name in _loaded:  # the hot path: model code asks per call, so no lock once built
        return _loaded[source_name]
    with _lock:
        if source_name not in _loaded:
            _loaded[source_name] = _build(Path(__file__).with_name(source_name))
        return _loaded[source_name]


def _build(source: Path) -> ModuleType | None:
    if not compiler_available():
        _log.warning("no C++ compiler found: %s falls back to pure torch", source.name)
        return None
    try:
        from torch.utils import cpp_extension

        digest = hashlib.sha1(source.read_bytes()).hexdigest()[:12]
        build_dir = cache_root() / "torch_extensions" / f"{source.stem}_{digest}"
        build_dir.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(
            name=f"fusedserve_{source.stem}",
            sources=[str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as error:  # a broken toolchain must not take the server down
        _log.warning("building %s failed (%s): falling back to pure torch", source.name, error)
        return None
