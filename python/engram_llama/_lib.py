"""The one libllama of the process: ours, patched, and loaded before anyone else's.

llama-cpp-python loads libllama from LLAMA_CPP_LIB_PATH when that is set at its import, so we
point it at the patched build shipped inside this package. Two libllama copies in one process
would each keep their own globals (backends, logging) and a context made by one would be
handed to the other's functions, so an unpatched one already loaded is refused.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path


class EngramImportError(ImportError):
    """The process cannot use the patched libllama (another one is loaded, or ours is missing)."""


def lib_dir() -> Path:
    override = os.environ.get("ENGRAM_LLAMA_LIB_DIR")
    return Path(override) if override else Path(__file__).resolve().parent / "lib"


def lib_path() -> Path:
    name = "libllama.dylib" if sys.platform == "darwin" else ("llama.dll" if sys.platform == "win32" else "libllama.so")
    return lib_dir() / name


def _loaded_libllamas() -> set[str]:
    """Paths of every libllama mapped into this process (Linux); empty elsewhere."""
    found: set[str] = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    path = parts[5].strip()
                    if os.path.basename(path).startswith("libllama."):
                        found.add(os.path.realpath(path))
    except OSError:
        pass
    return found


def _cxx_runtime_first() -> None:
    """Make the shared libstdc++ the first definition of every C++ runtime symbol (Linux).

    On the lent GPU machines' CUDA build (CUDA 13, their /opt/gcc compiler) libllama needs no
    libstdc++ of its own (its C++ references resolve against the ggml libraries), and making or
    loading any model crashed (an H200 backtrace: an ostream insert in print_info); with the system
    libstdc++ first in the global scope, as LD_PRELOAD puts it, the same build ran the hook tests on an
    H100 (scripts/device_check.sh, docs/PERFORMANCE.md). Promoting it is harmless elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL)
    except OSError:
        pass  # a C++ runtime under another name: nothing to promote


def load_llama_cpp():
    """Import llama_cpp bound to the patched libllama, or raise EngramImportError with one line."""
    mod = sys.modules.get("llama_cpp")
    if mod is not None and getattr(mod, "_engram_bound", False):
        return mod
    ours = lib_path()
    if not ours.exists():
        raise EngramImportError(
            f"engram_llama: the patched libllama is missing ({ours}); run scripts/setup.sh")
    ours_real = os.path.realpath(ours)

    others = {p for p in _loaded_libllamas() if p != ours_real}
    mod = sys.modules.get("llama_cpp.llama_cpp")
    if mod is not None:
        loaded = os.path.realpath(getattr(mod._lib, "_name", "") or "")
        if loaded != ours_real:
            others.add(loaded)
    if others:
        raise EngramImportError(
            "engram_llama: an unpatched libllama is already loaded (" + ", ".join(sorted(others)) +
            "); import engram_llama before llama_cpp, only one libllama may be loaded per process")

    _cxx_runtime_first()
    os.environ["LLAMA_CPP_LIB_PATH"] = str(ours.parent)
    import llama_cpp  # noqa: E402  (must follow the environment variable)

    if not hasattr(llama_cpp.llama_cpp._lib, "llama_engram_version"):
        raise EngramImportError(
            f"engram_llama: {llama_cpp.llama_cpp._lib._name} has no attention-bias hook (not patched)")
    llama_cpp._engram_bound = True
    return llama_cpp
