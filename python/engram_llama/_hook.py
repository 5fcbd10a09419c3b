"""cffi binding of the attention-bias hook (csrc/engram_bias.h) on a llama-cpp-python context.

The bias state lives on the C side, inside the llama_context, and is freed with it; this module
only validates shapes and turns return codes into exceptions carrying the C message.
"""
from __future__ import annotations

import ctypes
import enum
import re
from pathlib import Path
from typing import Iterable, Mapping

import cffi
import numpy as np

from . import llama_cpp as _llama_cpp  # noqa: F401  (the patched libllama first, bound to llama_cpp)
from ._lib import lib_path

_HERE = Path(__file__).resolve().parent
# installed next to the package; in a source checkout (PYTHONPATH=python) read csrc/ directly
_HEADER = next(p for p in (_HERE / "include" / "engram_bias.h", _HERE.parent.parent / "csrc" / "engram_bias.h")
               if p.exists())


def _cdef_source(header: str) -> str:
    """The header reduced to what cffi's cdef parses: no C++ guards, includes or export macros."""
    header = re.sub(r"#ifdef __cplusplus.*?#endif", "", header, flags=re.S)
    keep = []
    for line in header.splitlines():
        s = line.strip()
        if s.startswith("#define LLAMA_ENGRAM_"):
            keep.append(s)
        elif not s.startswith("#"):
            keep.append(line.replace("LLAMA_API ", ""))
    return ("typedef int32_t llama_pos;\ntypedef int32_t llama_seq_id;\n"
            "struct llama_model;\nstruct llama_context;\n" + "\n".join(keep))


ffi = cffi.FFI()
ffi.cdef(_cdef_source(_HEADER.read_text()))
# the same file llama_cpp loaded: dlopen hands back the already-mapped library
lib = ffi.dlopen(str(lib_path()))

GATE_ALL = lib.LLAMA_ENGRAM_GATE_ALL


class LayerKind(enum.IntEnum):
    INVALID = lib.LLAMA_ENGRAM_LAYER_INVALID
    NONE = lib.LLAMA_ENGRAM_LAYER_NONE  # no softmax attention (recurrent / linear attention)
    FULL = lib.LLAMA_ENGRAM_LAYER_FULL
    SWA = lib.LLAMA_ENGRAM_LAYER_SWA


class EngramError(RuntimeError):
    """A call into the hook was refused; .code is the llama_engram_status, str() the C message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _check(rc: int) -> None:
    if rc != lib.LLAMA_ENGRAM_OK:
        raise EngramError(rc, ffi.string(lib.llama_engram_last_error()).decode("utf-8", "replace"))


def _address(ptr) -> int:
    """Integer address of a ctypes pointer / c_void_p / int."""
    if isinstance(ptr, int):
        return ptr
    value = ctypes.cast(ptr, ctypes.c_void_p).value
    if not value:
        raise EngramError(lib.LLAMA_ENGRAM_ERR_NULL, "the llama context is NULL (model closed?)")
    return value


def layer_kinds(model_ptr) -> list[LayerKind]:
    """Kind of every layer of a loaded model (ctypes llama_model pointer)."""
    model = ffi.cast("struct llama_model *", _address(model_ptr))
    kinds = []
    il = 0
    while True:
        k = lib.llama_engram_layer_kind(model, il)
        if k == lib.LLAMA_ENGRAM_LAYER_INVALID:
            return kinds
        kinds.append(LayerKind(k))
        il += 1


class Hook:
    """The attention bias of one llama context.

    `Hook(llm)` takes a llama_cpp.Llama (kept alive by the hook) or a raw ctypes context pointer;
    alive: says whether the context is still open (a Llama's is read from it), so a call after the
    context was freed is an EngramError, not a write into freed memory.
    """

    def __init__(self, llm, alive=None):
        self._owner = llm
        if hasattr(llm, "ctx") and hasattr(llm, "model"):  # llama_cpp.Llama or the adapter over it
            ctx_ptr, model_ptr = llm.ctx, llm.model
            alive = alive or (lambda: llm.ctx is not None)
        else:
            ctx_ptr = llm
            import llama_cpp
            model_ptr = llama_cpp.llama_get_model(ctypes.c_void_p(_address(llm)))
        self._ctx = ffi.cast("struct llama_context *", _address(ctx_ptr))
        self._model_ptr = model_ptr
        self.kinds = layer_kinds(model_ptr)
        self._gates: dict[int, int] = {}  # seq -> the first query position its bias applies to
        self._alive = alive or (lambda: True)

    @property
    def _c(self):
        """The context, checked to be open."""
        if not self._alive():
            raise EngramError(lib.LLAMA_ENGRAM_ERR_NULL, "the llama context is closed")
        return self._ctx

    @property
    def n_layer(self) -> int:
        return len(self.kinds)

    def softmax_layers(self, kinds: Iterable[LayerKind] = (LayerKind.FULL, LayerKind.SWA)) -> list[int]:
        kinds = set(kinds)
        return [il for il, k in enumerate(self.kinds) if k in kinds]

    # layers -------------------------------------------------------------------------------

    def set_layer(self, il: int, scale: float) -> None:
        _check(lib.llama_engram_set_layer(self._c, int(il), float(scale)))

    def set_layers(self, scales: Mapping[int, float] | Iterable[int], scale: float | None = None) -> None:
        """Replace the biased layers: {layer: strength}, or a list of layers with one strength.

        Validates every layer first, so a refused layer leaves the previous setting in place.
        """
        if not isinstance(scales, Mapping):
            if scale is None:
                raise ValueError("set_layers(list) needs a strength")
            scales = {int(il): scale for il in scales}
        previous = self.layers()
        try:
            lib.llama_engram_clear_layers(self._c)
            for il, s in scales.items():
                self.set_layer(il, s)
        except EngramError:
            lib.llama_engram_clear_layers(self._c)
            for il, s in previous.items():
                self.set_layer(il, s)
            raise

    def layers(self) -> dict[int, float]:
        out = {}
        value = ffi.new("float *")
        for il in range(self.n_layer):
            _check(lib.llama_engram_get_layer(self._c, il, value))
            if value[0] != 0.0:
                out[il] = float(value[0])
        return out

    def clear_layers(self) -> None:
        _check(lib.llama_engram_clear_layers(self._c))

    # sequences ----------------------------------------------------------------------------

    def set_bias(self, bias, seq_id: int = 0, gate: int = GATE_ALL) -> None:
        """Bias over the key positions of a sequence, for queries at positions >= gate."""
        arr = np.ascontiguousarray(bias, dtype=np.float32)
        if arr.ndim != 1:
            raise EngramError(lib.LLAMA_ENGRAM_ERR_VALUE, f"bias must be one-dimensional, got shape {arr.shape}")
        ptr = ffi.cast("const float *", ffi.from_buffer(arr)) if arr.size else ffi.NULL
        _check(lib.llama_engram_set_seq(self._c, int(seq_id), ptr, int(arr.size), int(gate)))
        self._gates[int(seq_id)] = int(gate)

    def clear(self, seq_id: int | None = None) -> None:
        """Remove the bias of one sequence, or of all."""
        _check(lib.llama_engram_clear_seq(self._c, -1 if seq_id is None else int(seq_id)))
        if seq_id is None:
            self._gates.clear()
        else:
            self._gates.pop(int(seq_id), None)

    def gate(self, seq_id: int = 0) -> int | None:
        """The first query position that a sequence's bias applies to; None: no bias set. A
        decode's KV from that position on depends on the bias (what a cache may reuse)."""
        return self._gates.get(int(seq_id))

    @property
    def active(self) -> bool:
        return bool(lib.llama_engram_is_active(self._c))

    @property
    def mem_size(self) -> int:
        return int(lib.llama_engram_mem_size(self._c))
