"""engram-llama: steer a small local model's attention to the retrieved chunks that hold the answer.

Importing this package binds llama-cpp-python to the patched libllama shipped here; it fails with
one line if another libllama is already loaded in the process.
"""
from ._lib import EngramImportError, lib_path, load_llama_cpp

__version__ = "0.1.0"

llama_cpp = load_llama_cpp()

from ._hook import EngramError, Hook, LayerKind  # noqa: E402

__all__ = ["EngramError", "EngramImportError", "Hook", "LayerKind", "lib_path", "llama_cpp", "__version__"]
