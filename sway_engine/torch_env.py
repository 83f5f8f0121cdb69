"""What the installed torch can run on, found from its files: the persistent scoring cache
names a backend (and the embedding model) before anything loads, and importing torch to ask
would cost more than the whole re-evaluation of an unchanged adapter."""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

GPU_LIBRARIES = ("*torch_cuda*", "*torch_hip*", "*c10_cuda*", "*c10_hip*")


def cpu_only() -> bool:
    """True where the installed torch has neither CUDA nor ROCm libraries and this is not
    macOS (MPS): a device "auto" can only be the CPU. False where that cannot be told."""
    if sys.platform == "darwin":
        return False
    found = importlib.util.find_spec("torch")
    if found is None or not found.submodule_search_locations:
        return False
    lib = Path(next(iter(found.submodule_search_locations))) / "lib"
    return lib.is_dir() and not any(next(lib.glob(g), None) for g in GPU_LIBRARIES)


def versions(*names: str) -> str:
    """`name=version` of each installed distribution, read from its metadata (not imported)."""
    return " ".join(f"{name}={metadata.version(name)}" for name in names)
