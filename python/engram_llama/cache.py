"""The cache manager: every operation on the context's KV cells and recurrent state.

With the query gate the documents' cells do not depend on the bias, so one prefill of the
documents serves every question, bias setting and order that follows on them. This module decides
what is reused, keeps document checkpoints, moves the best chunk in the cache and puts the
documents back; its state snapshots (written once here) serve the reranker's small context too.

How a follow-up reuses the documents, by memory:
- dense and sliding-window caches are cut back to the documents (llama-cpp-python's contexts keep
  a full-size sliding-window cache; a cache whose window was overwritten is not reused);
- a recurrent state (Gated DeltaNet, Mamba) cannot be cut back: right after the documents'
  prefill a partial checkpoint (the recurrent state alone, llama_state_seq_*_ext with
  PARTIAL_ONLY; a few MB) is kept, restored, and then the attention cells are cut back as above;
- another document set asked about earlier is restored from a whole-sequence checkpoint, kept in
  a small LRU bounded by `cache_bytes` (--cache-ram).
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

from . import llama_cpp, move
from ._hook import LayerKind
from .plan import CACHE_RAM_MIB

PARTIAL = 1  # LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY: the recurrent / sliding-window part alone


def save_seq(ctx, seq: int = 0, partial: bool = False):
    """A copy of one sequence's cells and state (llama_state_seq_get_data); partial: only the
    recurrent state (and a sliding-window cache's cells), not the full-attention cells."""
    flags = PARTIAL if partial else 0
    n = llama_cpp.llama_state_seq_get_size_ext(ctx, seq, flags)
    buf = (ctypes.c_uint8 * n)()
    if llama_cpp.llama_state_seq_get_data_ext(ctx, buf, n, seq, flags) != n:
        raise RuntimeError("could not copy the sequence's state")
    return buf


def restore_seq(ctx, buf, seq: int = 0, clear: bool = True, partial: bool = False) -> bool:
    """The sequence as save_seq copied it (clear: its current cells removed first). Restoring beats
    shifting back: a second re-rotation of F16 keys rounds them, and that changed a later greedy
    answer on the same documents."""
    if clear and not partial:
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), seq, -1, -1)
    flags = PARTIAL if partial else 0
    return llama_cpp.llama_state_seq_set_data_ext(ctx, buf, len(buf), seq, flags) == len(buf)


@dataclass
class Checkpoint:
    tokens: tuple[int, ...]  # the documents it holds: a prompt's tokens before its question
    state: object            # save_seq's buffer

    @property
    def nbytes(self) -> int:
        return len(self.state)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 10 << 20 else f"{n / 2**20:.0f} MiB"


def _note(msg: str) -> None:
    print(f"engram-llama: {msg}", file=sys.stderr)


class CacheManager:
    """The KV cells and state of one context (sequence 0), under llama-cpp-python's record.
    cache_bytes: the whole-sequence checkpoints' cap (0: none kept)."""

    def __init__(self, llm, hook, cache_bytes: int = CACHE_RAM_MIB << 20):
        self.llm, self.hook = llm, hook
        self.seq = getattr(llm, "seq", 0)   # this manager's sequence (serve -np: one per slot)
        self._lock = getattr(llm, "lock", None) or contextlib.nullcontext()  # a context shared by sequences
        self._unbiased = 0  # how many cached tokens were decoded with no bias on their queries
        self.recurrent = any(k == LayerKind.NONE for k in hook.kinds)
        self.n_swa = int(llama_cpp.llama_model_n_swa(llm.model)) if LayerKind.SWA in hook.kinds else 0
        self.cache_bytes = max(0, int(cache_bytes))
        self.checkpoints: OrderedDict[tuple[int, ...], Checkpoint] = OrderedDict()  # LRU, newest last
        self._partial: Checkpoint | None = None  # recurrent state at the cached documents' end
        self._noted: set[str] = set()
        self.stats = {"reused": 0, "restored": 0, "prefilled": 0}
        self._how = "cache"
        self.last = ("none", 0)  # the last prefill: how the documents were reused, and how many tokens

    @property
    def checkpoint_bytes(self) -> int:
        return sum(c.nbytes for c in self.checkpoints.values()) + (self._partial.nbytes if self._partial else 0)

    def prefill(self, tokens: Sequence[int], docs: int | None = None, progress: bool | None = None) -> int:
        """Decode all but the last prompt token, reusing what the cache or a checkpoint holds of it
        (the documents, when a follow-up question comes on the same chunks); returns how many
        tokens were reused. docs: where the documents end (the question's first token; default
        the gate); a checkpoint is kept there when the documents were decoded now.

        With the query gate the documents' KV does not depend on the bias, so reusing it across
        questions and bias settings is exact; the question's does, so nothing from the gate on
        (of the cached decode or of this one) is reused: a question asked again, or prefilled
        before its bias was set, is decoded again under the bias it gets now.
        """
        llm = self.llm
        tokens = list(tokens)
        gate = self.hook.gate(self.seq)
        if docs is None:
            docs = gate
        cached = llm.cached()[:self._unbiased]
        p = 0
        for a, b in zip(cached, tokens[:-1][:gate]):
            if a != b:
                break
            p += 1
        self._unbiased = sys.maxsize if gate is None else gate  # the cache from here on: decoded under the bias
        p = self._reuse(tokens, p, docs)
        rest = tokens[p:-1]
        if progress is None:
            progress = sys.stderr.isatty() and len(rest) >= 1024
        from tqdm import tqdm

        # a checkpoint holds documents decoded with no bias on their queries (the gate at or past them)
        keep = docs if docs is not None and 0 < docs < len(tokens) and p < docs and self._unbiased >= docs else None
        with tqdm(total=len(rest), desc="prefill", unit="tok", disable=not progress, file=sys.stderr, leave=False) as bar:
            a = p
            while a < len(tokens) - 1:
                b = min(a + llm.n_batch, len(tokens) - 1)
                if keep is not None and a < keep < b:
                    b = keep  # a batch ends at the documents' end, for the checkpoint
                llm.eval(tokens[a:b])
                bar.update(b - a)
                if b == keep:
                    self._checkpoint(tokens[:keep])
                a = b
        self.stats["reused" if p else "prefilled"] += 1
        self.last = (self._how if p else "none", p)
        return p

    # reuse ------------------------------------------------------------------------------------

    def _reuse(self, tokens: list[int], p: int, docs: int | None) -> int:
        """Cut the cache back to the longest reusable prefix (p tokens matched the record), restore
        the recurrent state where it cannot be cut, or restore a checkpoint that holds more;
        returns how many tokens are reused."""
        llm = self.llm
        self._how = "cache"
        if p and (p == llm.n_cached or llm.cut(p)) and self._window_kept(p):  # dense, sliding-window
            return self._better(tokens, p, docs)
        part = self._partial
        n = len(part.tokens) if part is not None else 0
        if part is not None and 0 < n <= p and tuple(tokens[:n]) == part.tokens:  # p <= the gate: n is unbiased
            # the cached documents: their recurrent state back, then the attention cells cut there
            if self._load(part.state, partial=True) and llm.cut(n):
                llm.record(part.tokens)
                self._how = "recurrent state restored"
                return self._better(tokens, n, docs)
            self._failed("the documents' recurrent state")
        best = self._lookup(tokens, docs)
        if best is not None and self._restore_checkpoint(best):
            return len(best.tokens)
        llm.clear()
        self._partial = None
        return 0

    def _window_kept(self, p: int) -> bool:
        """A sliding-window cache still holds the window before position p. llama-cpp-python's
        contexts keep a full-size one (swa_full), so this holds; a context that keeps only
        n_swa + n_ubatch cells overwrites the oldest, and a long answer would leave holes there."""
        if self.n_swa <= 0:
            return True
        with self._lock:
            return llama_cpp.llama_memory_seq_pos_min(self.llm.memory, self.seq) <= max(0, p - self.n_swa)

    def _better(self, tokens: list[int], p: int, docs: int | None) -> int:
        """A checkpoint holding more of this prompt than the cut cache does replaces it."""
        best = self._lookup(tokens, docs)
        if best is None or len(best.tokens) <= p:
            return p
        if self._restore_checkpoint(best):
            return len(best.tokens)
        self._partial = None
        return 0  # the failed restore left the cache empty

    def _lookup(self, tokens: list[int], docs: int | None) -> Checkpoint | None:
        """The checkpoint holding the most of this prompt's documents; none when the bias reaches
        into the documents (no gate): their cells then depend on it."""
        if docs is None or not self.checkpoints or self._unbiased < docs:
            return None
        key = tuple(tokens[:docs])
        ck = self.checkpoints.get(key)
        if ck is None:  # a set whose documents begin this prompt's (the same chunks, one more after)
            ck = max((c for k, c in self.checkpoints.items() if len(k) < docs and key[:len(k)] == k),
                     key=lambda c: len(c.tokens), default=None)
        if ck is not None:
            self.checkpoints.move_to_end(ck.tokens)
        return ck

    def _restore_checkpoint(self, ck: Checkpoint) -> bool:
        llm = self.llm
        if self._load(ck.state):
            llm.record(ck.tokens)
            self._how = "checkpoint restored"
            self._partial = None
            if self.recurrent:
                self._keep_partial(ck.tokens)
            self.stats["restored"] += 1
            return True
        self._failed("a documents' checkpoint")
        self.checkpoints.pop(ck.tokens, None)
        llm.clear()
        return False

    def _save(self, partial: bool = False):
        with self._lock:
            return save_seq(self.llm.ctx, self.seq, partial)

    def _load(self, state, partial: bool = False) -> bool:
        with self._lock:
            return restore_seq(self.llm.ctx, state, self.seq, partial=partial)

    def _failed(self, what: str) -> None:
        _note(f"{what} did not restore; prefilling the documents again")

    # checkpoints ------------------------------------------------------------------------------

    def _checkpoint(self, docs: list[int]) -> None:
        """Right after the documents' decode: their state kept for later questions."""
        if self.recurrent:
            self._keep_partial(docs)
        if self.cache_bytes <= 0:
            return
        key = tuple(docs)
        with self._lock:
            n = llama_cpp.llama_state_seq_get_size_ext(self.llm.ctx, self.seq, 0)
        if n > self.cache_bytes:
            self._once("cap", f"the documents' checkpoint ({_mib(n)}) does not fit in --cache-ram "
                              f"({_mib(self.cache_bytes)}); questions on other documents prefill again")
            return
        self.checkpoints.pop(key, None)
        while self.checkpoints and sum(c.nbytes for c in self.checkpoints.values()) + n > self.cache_bytes:
            self.checkpoints.popitem(last=False)
        try:
            self.checkpoints[key] = Checkpoint(key, self._save())
        except (RuntimeError, MemoryError):
            self._once("save", "could not keep the documents' checkpoint; questions on other documents prefill again")

    def _keep_partial(self, docs) -> None:
        try:
            self._partial = Checkpoint(tuple(docs), self._save(partial=True))
        except (RuntimeError, MemoryError):
            self._partial = None
            self._once("partial", "could not keep the documents' recurrent state; follow-up questions prefill again")

    def _once(self, key: str, msg: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            _note(msg)

    def forget(self) -> None:
        """Drop every checkpoint (benchmarks time a cold prefill)."""
        self.checkpoints.clear()
        self._partial = None

    # move and peek ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def moved(self, tokens: Sequence[int], q0: int, a: int, b: int, reread: bool = False) -> Iterator[list[int]]:
        """The documents (tokens before q0) prefilled in the given order (reused when cached), a copy
        of their cells kept, then [a, b) shifted to their end (reread: its tokens decoded there
        again instead); yields the tokens in the order the cache now holds, for the question and
        answer to follow. On leaving, the documents' cells come back in the given order for the
        next question to reuse."""
        tokens = list(tokens)
        self.prefill(tokens[:q0 + 1], docs=q0)
        ctx, llm = self.llm.ctx, self.llm
        ck = self.checkpoints.get(tuple(tokens[:q0]))
        saved = ck.state if ck is not None else self._save()
        try:
            if reread:
                # through llama-cpp-python's record: the chunk read from its new position on; the
                # gate keeps its queries unbiased, as a document's
                with self._lock:
                    move.reread_to_end(llama_cpp, llm.memory, llm.eval_at, tokens, a, b, q0, seq=self.seq)
            else:
                with self._lock:
                    move.shift_to_end(llama_cpp, llm.memory, a, b, q0, seq=self.seq)
            order = move.moved_tokens(tokens, a, b, q0)
            llm.record(order[:q0])
            yield order
        finally:  # never leave the documents moved under the given order's record
            self._restore(tokens, q0, saved)

    def _restore(self, tokens: list[int], q0: int, saved) -> None:
        if self._load(saved):
            self.llm.record(tokens[:q0])
        else:  # the next question prefills again
            self.llm.clear()

    def peek(self, tokens: Sequence[int], q0: int) -> None:
        """Decode tokens[q0:] after the documents (tokens[:q0], prefilled or reused) and take them
        out of the cache again: a look at how the question reads them (research probes), leaving
        the documents as they were (a recurrent state through its partial checkpoint)."""
        tokens = list(tokens)
        self.prefill(tokens[:q0 + 1], docs=q0)
        self.llm.eval(tokens[q0:])
        self._unbiased = min(self._unbiased, q0)
        if self.recurrent:
            self._reuse(tokens, q0, q0)
        elif not self.llm.cut(q0):
            self.llm.clear()
