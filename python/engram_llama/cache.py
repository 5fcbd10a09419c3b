"""The cache manager: every operation on the context's KV cells and recurrent state.

With the query gate the documents' cells do not depend on the bias, so one prefill of the
documents serves every question, bias setting and order that follows on them; this module decides
what is reused, moves the best chunk in the cache and puts the documents back, and keeps and
restores per-sequence state snapshots (written once here; the reranker's small context uses them
too).
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import Iterator, Sequence

from . import llama_cpp, move
from ._hook import LayerKind


def save_seq(ctx, seq: int = 0):
    """A copy of one sequence's cells and state (llama_state_seq_get_data)."""
    n = llama_cpp.llama_state_seq_get_size(ctx, seq)
    buf = (ctypes.c_uint8 * n)()
    if llama_cpp.llama_state_seq_get_data(ctx, buf, n, seq) != n:
        raise RuntimeError("could not copy the sequence's state")
    return buf


def restore_seq(ctx, buf, seq: int = 0, clear: bool = True) -> bool:
    """The sequence as save_seq copied it (clear: its current cells removed first). Restoring beats
    shifting back: a second re-rotation of F16 keys rounds them, and that changed a later greedy
    answer on the same documents."""
    if clear:
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), seq, -1, -1)
    return llama_cpp.llama_state_seq_set_data(ctx, buf, len(buf), seq) == len(buf)


class CacheManager:
    """The KV cells and state of one context (sequence 0), under llama-cpp-python's record."""

    def __init__(self, llm, hook):
        self.llm, self.hook = llm, hook
        self._unbiased = 0  # how many cached tokens were decoded with no bias on their queries
        self.recurrent = any(k == LayerKind.NONE for k in hook.kinds)

    def prefill(self, tokens: Sequence[int], progress: bool | None = None) -> int:
        """Decode all but the last prompt token, reusing the cached prefix (the documents, when a
        follow-up question comes on the same chunks); returns how many tokens were reused.

        With the query gate the documents' KV does not depend on the bias, so reusing it across
        questions and bias settings is exact; the question's does, so nothing from the gate on
        (of the cached decode or of this one) is reused: a question asked again, or prefilled
        before its bias was set, is decoded again under the bias it gets now. Recurrent and
        hybrid memories cannot be cut back to a prefix, so they prefill again.
        """
        llm = self.llm
        cached = llm.cached()[:self._unbiased]
        gate = self.hook.gate(0)
        p = 0
        for a, b in zip(cached, list(tokens[:-1])[:gate]):
            if a != b:
                break
            p += 1
        self._unbiased = sys.maxsize if gate is None else gate  # the cache from here on: decoded under the bias
        if not llm.cut(p):
            llm.clear()
            p = 0
        rest = list(tokens[p:-1])
        if progress is None:
            progress = sys.stderr.isatty() and len(rest) >= 1024
        from tqdm import tqdm

        with tqdm(total=len(rest), desc="prefill", unit="tok", disable=not progress, file=sys.stderr, leave=False) as bar:
            for a in range(0, len(rest), llm.n_batch):
                part = rest[a:a + llm.n_batch]
                llm.eval(part)
                bar.update(len(part))
        return p

    @contextlib.contextmanager
    def moved(self, tokens: Sequence[int], q0: int, a: int, b: int, reread: bool = False) -> Iterator[list[int]]:
        """The documents (tokens before q0) prefilled in the given order (reused when cached), a copy
        of their cells kept, then [a, b) shifted to their end (reread: its tokens decoded there
        again instead); yields the tokens in the order the cache now holds, for the question and
        answer to follow. On leaving, the documents' cells come back in the given order for the
        next question to reuse."""
        tokens = list(tokens)
        self.prefill(tokens[:q0 + 1])
        ctx, llm = self.llm.ctx, self.llm
        saved = save_seq(ctx)
        try:
            if reread:
                # through llama-cpp-python's record: the chunk read from its new position on; the
                # gate keeps its queries unbiased, as a document's
                move.reread_to_end(llama_cpp, llm.memory, llm.eval_at, tokens, a, b, q0)
            else:
                move.shift_to_end(llama_cpp, llm.memory, a, b, q0)
            order = move.moved_tokens(tokens, a, b, q0)
            llm.record(order[:q0])
            yield order
        finally:  # never leave the documents moved under the given order's record
            self._restore(tokens, q0, saved)

    def _restore(self, tokens: list[int], q0: int, saved) -> None:
        if restore_seq(self.llm.ctx, saved):
            self.llm.record(tokens[:q0])
        else:  # the next question prefills again
            self.llm.clear()

    def peek(self, tokens: Sequence[int], q0: int) -> None:
        """Decode tokens[q0:] after the documents (tokens[:q0], prefilled or reused) and take them
        out of the cache again: a look at how the question reads them (research probes), leaving
        the documents as they were. A recurrent state cannot be cut back, so it is restored from a
        snapshot instead."""
        tokens = list(tokens)
        self.prefill(tokens[:q0 + 1])
        saved = save_seq(self.llm.ctx) if self.recurrent else None
        try:
            self.llm.eval(tokens[q0:])
        finally:
            if saved is not None:
                self._restore(tokens, q0, saved)
            elif not self.llm.cut(q0):
                self.llm.clear()
