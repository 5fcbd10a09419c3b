"""engram-llama: steer a small local model's attention to the retrieved chunks that hold the answer.

The patched libllama is loaded on first use (`engram_llama.llama_cpp`, `Hook`, `EngramLlama`, or a
module that needs it), so the text side (`chunks`, `table`, `extract`, `relevance`) imports
without it. Loading binds llama-cpp-python to the patched library and fails with one line if
another libllama is already loaded in the process.
"""
from ._lib import EngramImportError, lib_path

__version__ = "0.1.0"

_LAZY = {"EngramError": "_hook", "Hook": "_hook", "LayerKind": "_hook",
         "EngramLlama": "runtime", "Answer": "runtime", "Settings": "plan"}


def __getattr__(name: str):
    if name == "llama_cpp":
        from ._lib import load_llama_cpp

        mod = load_llama_cpp()
        globals()["llama_cpp"] = mod
        return mod
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engram_llama' has no attribute {name!r}")


__all__ = ["EngramError", "EngramImportError", "EngramLlama", "Answer", "Hook", "LayerKind", "Settings",
           "lib_path", "llama_cpp", "__version__"]
