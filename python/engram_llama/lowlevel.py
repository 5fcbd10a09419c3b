"""A small driver over llama.cpp's C API for exact experiments: token batches with explicit
positions and sequences, logits of every token, and capture of named graph tensors through the
eval callback. The tests and benchmarks use it where llama_cpp.Llama hides those knobs.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from . import llama_cpp
from ._hook import Hook
from ._lib import lib_dir

GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


class _TensorHead(ctypes.Structure):
    # the leading fields of struct ggml_tensor (ggml.h of the pinned llama.cpp)
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
                ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16)]


_ggml = None


def ggml_base():
    global _ggml
    if _ggml is None:
        name = "libggml-base.dylib" if os.uname().sysname == "Darwin" else "libggml-base.so"
        _ggml = ctypes.CDLL(str(lib_dir() / name))
        _ggml.ggml_get_name.restype = ctypes.c_char_p
        _ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
        _ggml.ggml_nbytes.restype = ctypes.c_size_t
        _ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
        _ggml.ggml_is_contiguous.restype = ctypes.c_bool
        _ggml.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
        _ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        _ggml.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        _ggml.ggml_nelements.restype = ctypes.c_int64
        _ggml.ggml_nelements.argtypes = [ctypes.c_void_p]
        _ggml.gguf_init_from_file.restype = ctypes.c_void_p
        _ggml.gguf_init_from_file.argtypes = [ctypes.c_char_p, GGUFInitParams]
        _ggml.gguf_free.argtypes = [ctypes.c_void_p]
    return _ggml


class GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


_quiet_cb = None


def quiet_logs() -> None:
    """Silence llama.cpp's logging (it is chatty at INFO)."""
    global _quiet_cb
    if _quiet_cb is None:
        _quiet_cb = llama_cpp.llama_log_callback(lambda level, text, ud: None)
        llama_cpp.llama_log_set(_quiet_cb, ctypes.c_void_p(0))


@dataclass
class Token:
    id: int
    pos: int
    seq: int = 0
    logits: bool = True


class Model:
    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0, vocab_only: bool = False):
        quiet_logs()
        self.path = Path(path)
        p = llama_cpp.llama_model_default_params()
        p.n_gpu_layers = n_gpu_layers
        p.vocab_only = vocab_only
        self.ptr = llama_cpp.llama_model_load_from_file(str(self.path).encode(), p)
        if not self.ptr:
            raise RuntimeError(f"could not load {self.path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_layer = llama_cpp.llama_model_n_layer(self.ptr)
        self._controls = None

    def controls(self):
        """control_strings() of this model's vocabulary, built once."""
        if self._controls is None:
            self._controls = control_strings(self.vocab) or False
        return self._controls or None

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


class Context:
    """One llama_context with an optional capture of graph tensors by name.

    capture: a predicate on tensor names ("kq_soft_max-3"); captured tensors of the last decode are
    in .captured[name] as numpy arrays with numpy axis order (ne reversed), one entry per ubatch
    appended to a list.
    """

    def __init__(self, model: Model, n_ctx: int = 512, n_batch: int = 512, n_ubatch: int = 512,
                 n_seq_max: int = 1, flash_attn: bool = False, n_threads: int = 2,
                 kv_unified: bool = False, capture: Callable[[str], bool] | None = None):
        self.model = model
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_ubatch, n_seq_max
        p.n_threads = p.n_threads_batch = n_threads
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.kv_unified = kv_unified
        self.captured: dict[str, list[np.ndarray]] = {}
        self.op_params: dict[str, np.ndarray] = {}
        self._capture = capture
        if capture is not None:
            self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)
            p.cb_eval = self._cb
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, p)
        if not self.ptr:
            raise RuntimeError("could not create the llama context")
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self.hook = Hook(self.ptr, alive=lambda: self.ptr is not None)

    def _on_eval(self, t, ask, _ud):
        ggml = ggml_base()
        name = ggml.ggml_get_name(t).decode()
        if ask:
            return bool(self._capture(name))
        head = _TensorHead.from_address(t)
        if head.type not in (GGML_TYPE_F32, GGML_TYPE_F16) or not ggml.ggml_is_contiguous(t):
            return True
        dtype = np.float32 if head.type == GGML_TYPE_F32 else np.float16
        shape = tuple(reversed([head.ne[i] for i in range(4)]))
        buf = np.empty(shape, dtype=dtype)
        ggml.ggml_backend_tensor_get(t, buf.ctypes.data, 0, ggml.ggml_nbytes(t))
        self.captured.setdefault(name, []).append(buf.astype(np.float32))
        # op parameters as floats (soft_max_ext keeps its scale in op_params[0])
        self.op_params[name] = np.frombuffer(bytes(head.op_params), dtype=np.float32).copy()
        return True

    def clear_kv(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ptr), True)

    def decode(self, tokens: Sequence[Token]) -> np.ndarray:
        """Decode the tokens in one llama_batch; returns the logits of the tokens that asked for them."""
        self._decode(tokens)
        return np.array([self._row(i).copy() for i, t in enumerate(tokens) if t.logits])

    def logprobs(self, tokens: Sequence[Token], targets: Sequence[int]) -> np.ndarray:
        """Decode, then log p(targets[j]) under the j-th row of logits asked for, without keeping
        the rows (a 262K vocabulary makes each 1 MB)."""
        self._decode(tokens)
        rows = [i for i, t in enumerate(tokens) if t.logits]
        if len(rows) != len(targets):
            raise ValueError(f"{len(targets)} targets for {len(rows)} rows of logits")
        out = np.empty(len(rows))
        for j, i in enumerate(rows):
            z = self._row(i).astype(np.float64)
            m = z.max()
            out[j] = z[targets[j]] - m - np.log(np.exp(z - m).sum())
        return out

    def _row(self, i: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, i)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def _decode(self, tokens: Sequence[Token]) -> None:
        self.captured = {}
        n = len(tokens)
        batch = llama_cpp.llama_batch_init(n, 0, self.n_seq_max)
        try:
            for i, t in enumerate(tokens):
                batch.token[i] = t.id
                batch.pos[i] = t.pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = t.seq
                batch.logits[i] = t.logits
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(self.ptr, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc})")
        finally:
            llama_cpp.llama_batch_free(batch)

    def decode_seq(self, ids: Iterable[int], start: int = 0, seq: int = 0, all_logits: bool = True) -> np.ndarray:
        ids = list(ids)
        toks = [Token(int(t), start + i, seq, all_logits or i == len(ids) - 1) for i, t in enumerate(ids)]
        return self.decode(toks)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def token_piece(vocab, token: int, special: bool = True) -> bytes:
    """The exact bytes of a token (llama-cpp-python's wrapper returns its zero-padded buffer)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


def tokenize(vocab, text: str, add_bos: bool, special: bool = True) -> list[int]:
    """Token ids of text (llama_tokenize, its buffer grown when the first is too small)."""
    data = text.encode("utf-8")
    buf = (llama_cpp.llama_token * (len(data) + 8))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), add_bos, special)
    if n < 0:
        buf = (llama_cpp.llama_token * -n)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), add_bos, special)
    return list(buf[:n])


def control_strings(vocab):
    """A matcher of the vocabulary's control-token strings ("<|im_end|>", "<end_of_turn>"), which
    llama_tokenize with special=True turns into those tokens wherever they appear; None if none.
    Built once per model (Gemma-3 has 6,250 such strings; 0.2 s)."""
    import ahocorasick

    flags = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    auto = ahocorasick.Automaton()
    for t in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        if llama_cpp.llama_vocab_get_attr(vocab, t) & flags:
            s = (llama_cpp.llama_vocab_get_text(vocab, t) or b"").decode("utf-8", "ignore")
            if s:
                auto.add_word(s, len(s))
    if not len(auto):
        return None
    auto.make_automaton()
    return auto


def tokenize_plain(vocab, text: str, add_bos: bool, plain: Sequence[tuple[int, int]] = (),
                   controls=None) -> list[int]:
    """Token ids of a rendered prompt: the template's control tokens parsed, but a control token's
    string inside a `plain` char span (a document, the question: the user's text) only text, so a
    document holding "<|im_end|>" cannot end the chat turn. Without such a string the tokens are
    tokenize()'s exactly; with one, the prompt is tokenized in pieces cut around it."""
    cuts: list[tuple[int, int]] = []
    if controls is not None:
        for a, b in sorted(plain):
            for e, n in controls.iter_long(text[a:b]):
                if not cuts or a + e + 1 - n >= cuts[-1][1]:  # (overlapping spans: the first cut)
                    cuts.append((a + e + 1 - n, a + e + 1))
    if not cuts:
        return tokenize(vocab, text, add_bos)
    out: list[int] = []
    pos = 0
    for a, b in cuts + [(len(text), len(text))]:
        for seg, special in ((text[pos:a], True), (text[a:b], False)):
            if seg:
                out += tokenize(vocab, seg, False, special)
        pos = b
    # what add_bos (llama.cpp's add_special) puts around the whole text: BOS first, EOS last if the
    # vocabulary adds one
    ends = tokenize(vocab, "", add_bos)
    head = ends[:1] if ends and ends[0] == llama_cpp.llama_vocab_bos(vocab) else []
    return head + out + ends[len(head):]


def meta_str(model_ptr, key: str) -> str | None:
    """A GGUF metadata string of a loaded model (None when absent)."""
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_model_meta_val_str(model_ptr, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        llama_cpp.llama_model_meta_val_str(model_ptr, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace")
