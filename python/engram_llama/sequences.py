"""N sequences of one llama context, for `serve -np N`: each sequence behaves as a LlamaAdapter
(what the cache manager, the retriever and `ask` use), with its own token record, bias, KV stream
and checkpoints, while the context, the weights and the hook are shared.

llama.cpp decodes one batch at a time per context, so every operation on the context (a decode, a
state copy, a cell edit, a change of the hook) holds the context's lock; sequences interleave
token by token. Generation is llama-cpp-python's greedy / top-k sampling with its stop-string rule
(text that may begin a stop string is held back), so an answer here equals `run`'s.
"""
from __future__ import annotations

import threading
from typing import Iterator, Sequence

import numpy as np

from . import llama_cpp
from ._hook import Hook
from .lowlevel import Context, Model, Token, meta_str, token_piece, tokenize_plain


class SharedContext:
    """The model, one context with n_seq sequences (a KV stream of n_ctx / n_seq cells each), its
    hook, the lock."""

    def __init__(self, model_path: str, n_ctx: int, n_seq: int, n_threads: int | None = None,
                 n_gpu_layers: int = 0, flash_attn: bool = False, n_batch: int = 512):
        import os

        self.model_ = Model(model_path, n_gpu_layers=n_gpu_layers)
        self.n_threads = n_threads or os.cpu_count() or 1
        # a KV stream per sequence (not one unified buffer): a sequence's cells then do not
        # interleave with another's, and its answers do not depend on what runs beside it (with a
        # unified buffer they did, by float rounding over the other sequences' masked cells)
        self.context = Context(self.model_, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_seq_max=n_seq,
                               flash_attn=flash_attn, n_threads=self.n_threads, kv_unified=False)
        self.n_ctx, self.n_seq, self.n_batch = n_ctx, n_seq, n_batch
        self.lock = threading.RLock()
        self.hook = LockedHook(self.context.hook, self.lock)
        self.closed = False

    def sequence(self, seq: int) -> "SeqAdapter":
        return SeqAdapter(self, seq)

    def close(self) -> None:
        with self.lock:  # after any decode in flight; a later one is refused
            self.closed = True
            self.context.close()
            self.model_.close()


class LockedHook:
    """The context's hook; every call under the context's lock (a change of the bias while another
    sequence decodes would race the graph that reads it)."""

    def __init__(self, hook: Hook, lock):
        self._hook, self._lock = hook, lock

    def __getattr__(self, name):
        with self._lock:
            attr = getattr(self._hook, name)  # (properties read the context too)
        if not callable(attr):
            return attr

        def call(*a, **kw):
            with self._lock:
                return attr(*a, **kw)
        return call


class SeqAdapter:
    """One sequence of a SharedContext, with LlamaAdapter's interface."""

    def __init__(self, shared: SharedContext, seq: int):
        self.shared, self.seq = shared, seq
        self.lock = shared.lock
        m = shared.model_
        self.vocab = m.vocab
        self.n_threads = shared.n_threads
        self.n_ctx = shared.n_ctx // shared.n_seq   # what one sequence may fill while all run
        self.n_batch = shared.n_batch
        self.n_vocab = m.n_vocab
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(m.ptr))
        template = meta_str(m.ptr, "tokenizer.chat_template")
        self.metadata = {"tokenizer.chat_template": template} if template else {}
        self.bos_id = llama_cpp.llama_vocab_bos(m.vocab)
        self.eos_id = llama_cpp.llama_vocab_eos(m.vocab)
        self.bos = token_piece(m.vocab, self.bos_id).decode("utf-8", "ignore") if self.bos_id >= 0 else ""
        self.eos = token_piece(m.vocab, self.eos_id).decode("utf-8", "ignore") if self.eos_id >= 0 else ""
        self._add_bos = self.bos_id >= 0 and bool(llama_cpp.llama_vocab_get_add_bos(m.vocab))
        self._tokens: list[int] = []
        self._logits: np.ndarray | None = None
        self.finish_reason: str | None = None
        self.seed = 0  # sampling at a temperature: the same request, the same answer

    # pointers for the C side -------------------------------------------------------------------

    @property
    def ctx(self):
        return self.shared.context.ptr

    @property
    def model(self):
        return self.shared.model_.ptr

    @property
    def memory(self):
        return llama_cpp.llama_get_memory(self.ctx)

    def can_shift(self) -> bool:
        return bool(llama_cpp.llama_memory_can_shift(self.memory))

    # text -------------------------------------------------------------------------------------

    def tokenize(self, text: str, plain: Sequence[tuple[int, int]] = ()) -> tuple[list[int], list[bytes], int]:
        add_bos = self._add_bos and not (self.bos and text.startswith(self.bos))
        toks = tokenize_plain(self.vocab, text, add_bos, plain, self.shared.model_.controls() if plain else None)
        n_prefix = 1 if add_bos and toks and toks[0] == self.bos_id else 0
        return toks, [token_piece(self.vocab, t) for t in toks], n_prefix

    def detokenize(self, ids: Sequence[int]) -> str:
        return b"".join(token_piece(self.vocab, t, special=False) for t in ids).decode("utf-8", "ignore")

    # what the sequence holds ------------------------------------------------------------------

    @property
    def n_cached(self) -> int:
        return len(self._tokens)

    def cached(self) -> list[int]:
        return list(self._tokens)

    def cut(self, p: int) -> bool:
        if p <= 0:
            return False
        with self.lock:
            if not llama_cpp.llama_memory_seq_rm(self.memory, self.seq, p, -1):
                return False
        del self._tokens[p:]
        return True

    def clear(self) -> None:
        with self.lock:
            llama_cpp.llama_memory_seq_rm(self.memory, self.seq, -1, -1)
        self._tokens = []
        self._logits = None

    def record(self, tokens: Sequence[int]) -> None:
        self._tokens = [int(t) for t in tokens]

    def eval(self, ids: Sequence[int]) -> None:
        ids = [int(t) for t in ids]
        with self.lock:
            if self.shared.closed:
                raise RuntimeError("the shared context is closed")
            try:
                llama_cpp.llama_memory_seq_rm(self.memory, self.seq, len(self._tokens), -1)
                for a in range(0, len(ids), self.n_batch):
                    part = ids[a:a + self.n_batch]
                    n0 = len(self._tokens)
                    toks = [Token(t, n0 + i, self.seq, i == len(part) - 1) for i, t in enumerate(part)]
                    self._logits = self.shared.context.decode(toks)[-1].copy()  # the next decode overwrites it
                    self._tokens.extend(part)
            except BaseException:
                self.clear()  # a failed decode may leave a state the record does not describe
                raise

    def eval_at(self, ids: Sequence[int], pos0: int) -> None:
        del self._tokens[pos0:]
        self.eval(ids)

    def logits(self) -> np.ndarray:
        return self._logits.copy()

    def complete(self, tokens: Sequence[int], max_tokens: int, temperature: float,
                 stop: list[str], before_sample=None) -> Iterator[str]:
        """llama-cpp-python's create_completion(stream=True) on this sequence: the cached prefix
        reused (at least the last prompt token decoded again), greedy at temperature 0, else its
        default sampling chain (_sample); text that may begin a stop string is held back, and a
        stop string ends the text. before_sample(k): as LlamaAdapter.complete's."""
        tokens = [int(t) for t in tokens]
        p = 0
        for a, b in zip(self._tokens, tokens):
            if a != b:
                break
            p += 1
        p = min(p, len(tokens) - 1)
        if p < len(self._tokens) and not self.cut(p):  # (a recurrent state cannot be cut back)
            self.clear()
            p = 0
        self.eval(tokens[p:])
        self.finish_reason = "length"
        out, sent = b"", 0
        rng = np.random.default_rng(self.seed)
        n = 0
        # as llama-cpp-python: an answer that ends inside a UTF-8 character at max_tokens goes on
        # until the character is whole
        while n < max_tokens or (out and _tail_len(out) and n < max_tokens + 4):
            n += 1
            if before_sample is not None:
                before_sample(n - 1)
            tok = self._sample(temperature, rng)
            if llama_cpp.llama_vocab_is_eog(self.vocab, tok):
                self.finish_reason = "stop"
                break
            out += token_piece(self.vocab, tok, special=False)
            text = out.decode("utf-8", "ignore")
            hit = min((i for i in (text.find(s, sent) for s in stop if s) if i >= 0), default=-1)
            if hit >= 0:
                if hit > sent:
                    yield text[sent:hit]
                self.finish_reason = "stop"
                return
            # hold back a tail that may begin a stop string (or a split UTF-8 character)
            hold = max((k for s in stop if s for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            safe = len(text) - hold  # (an unfinished UTF-8 character is not in text yet)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
            self.eval([tok])
        text = out.decode("utf-8", "ignore")
        if len(text) > sent:
            yield text[sent:]

    def _sample(self, temperature: float, rng) -> int:
        """llama-cpp-python's chain at its defaults: greedy at temperature 0, else top-k 40, top-p
        0.95 and min-p 0.05 on the probabilities, then the temperature, then a draw."""
        z = self._logits
        if temperature <= 0:
            return int(np.argmax(z))
        top = np.argsort(-z, kind="stable")[:40]
        pr = np.exp(z[top] - z[top[0]])
        pr /= pr.sum()
        keep = int(np.searchsorted(np.cumsum(pr), 0.95) + 1)   # top-p: the smallest set reaching 0.95
        keep = max(1, min(keep, int((pr >= 0.05 * pr[0]).sum())))  # min-p
        w = np.exp((z[top[:keep]] - z[top[0]]) / temperature)
        return int(top[rng.choice(keep, p=w / w.sum())])

    def close(self) -> None:
        self.clear()


def _tail_len(b: bytes) -> int:
    """How many bytes at the end of b begin a UTF-8 character not yet complete (0: none)."""
    for k in range(1, min(4, len(b)) + 1):
        c = b[-k]
        if c & 0xC0 != 0x80:  # a lead byte (or ASCII)
            need = 1 if c < 0x80 else 2 if c >> 5 == 6 else 3 if c >> 4 == 14 else 4
            return k if need > k else 0
    return 0
