"""How likely the model finds the question after each chunk: a relevance signal that reads meaning,
not shared words.

BM25 ranks hard distractors (passages picked for sharing the question's words) close to the gold,
and it cannot tell "Article One" from "article 1" or a continent from Australia. The model that
answers can: log p(question | chunk), read as "which passage would make someone ask this", is
zero-shot passage reranking (UPR, Sachan et al. 2022). Each candidate is its own short sequence
in one batch on a small second context, so it costs a few hundred tokens per chunk and never
touches the long context's KV cache or its bias (the hook is per context).

A chunk's state after its text does not depend on the question, so it is kept (a per-sequence
state snapshot, which covers recurrent layers too, where a KV cache cannot be cut back): a follow-up
question over the same chunks decodes only its own tokens.
"""
from __future__ import annotations

import types
from collections import OrderedDict
from typing import Sequence

import numpy as np

from . import llama_cpp
from .cache import restore_seq, save_seq
from .chunks import Chunk
from .lowlevel import Context, Token, tokenize

# tokens of a chunk read for its score: NQ passages (~100 words) and the CLI's chunks (<= 800
# characters) fit; a longer chunk is judged on its opening
MAX_CHUNK_TOKENS = 256
MAX_QUESTION_TOKENS = 64
# chunk states kept for follow-up questions (SmolLM2: ~23 KB per token, ~6 MB per 256-token chunk)
STATE_CACHE_BYTES = 256 << 20


def _question(q: str) -> str:
    q = q.strip()
    q = q[:1].upper() + q[1:]
    return q if q.endswith("?") else q + "?"


class QueryLikelihood:
    """Mean log-probability per token of the question, written after each chunk, under the model.

    model: a llama_model pointer (llama_cpp.Llama.model); n_seq: how many chunks one call scores.
    """

    def __init__(self, model_ptr, n_seq: int = 8, n_threads: int = 2):
        vocab = llama_cpp.llama_model_get_vocab(model_ptr)
        self.vocab = vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.n_seq = n_seq
        n_ctx = n_seq * (MAX_CHUNK_TOKENS + MAX_QUESTION_TOKENS + 8)
        shim = types.SimpleNamespace(ptr=model_ptr, n_vocab=self.n_vocab)
        # one unified KV buffer shared by the sequences; the whole batch in one decode call
        self.ctx = Context(shim, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=512, n_seq_max=n_seq,
                           n_threads=n_threads, kv_unified=True)
        self._states: OrderedDict[tuple[str, str], object] = OrderedDict()  # (source, text) -> state
        self._bytes = 0
        self.restored = 0  # chunks whose state was restored / read afresh (benchmarks report them)
        self.read = 0

    def tokenize(self, text: str, bos: bool) -> list[int]:
        return tokenize(self.vocab, text, bos and self.add_bos, special=False)

    def prefix(self, chunk: Chunk) -> list[int]:
        """The tokens before the question: the chunk (source label and text, as the prompt shows
        it), cut to MAX_CHUNK_TOKENS, then the question's cue."""
        text = f"{chunk.source}. {chunk.text}" if chunk.source else chunk.text
        body = self.tokenize(text, bos=True)[:MAX_CHUNK_TOKENS]
        return body + self.tokenize("\n\nQuestion:", bos=False)

    def __call__(self, question: str, chunks: Sequence[Chunk]) -> np.ndarray:
        q = self.tokenize(" " + _question(question), bos=False)[:MAX_QUESTION_TOKENS]
        out = np.zeros(len(chunks))
        if not q:
            return out
        for a in range(0, len(chunks), self.n_seq):
            part = chunks[a:a + self.n_seq]
            prefixes = [self.prefix(c) for c in part]
            mem = llama_cpp.llama_get_memory(self.ctx.ptr)
            llama_cpp.llama_memory_clear(mem, True)
            # every chunk's text but its last token: restored from a snapshot, or decoded (no
            # logits) and then kept
            fresh = []
            for s, (c, ids) in enumerate(zip(part, prefixes)):
                state = self._states.get(self._key(c))
                if state is not None and self._restore(state, s):
                    self._states.move_to_end(self._key(c))
                    self.restored += 1
                else:
                    fresh.append(s)
            self.read += len(fresh)
            if fresh:
                self.ctx._decode([Token(t, i, s, False) for s in fresh for i, t in enumerate(prefixes[s][:-1])])
                for s in fresh:
                    self._keep(self._key(part[s]), s)
            # then the last token and the question: the logits at the last token and at each
            # question token but the last predict question tokens 0..n-1
            batch = []
            for s, ids in enumerate(prefixes):
                n_p = len(ids)
                tail = [ids[-1]] + q
                batch += [Token(t, n_p - 1 + i, s, i < len(q)) for i, t in enumerate(tail)]
            lp = self.ctx.logprobs(batch, q * len(part))
            out[a:a + len(part)] = lp.reshape(len(part), len(q)).mean(axis=1)
        return out

    @staticmethod
    def _key(chunk: Chunk) -> tuple[str, str]:
        return (chunk.source, chunk.text)

    def _keep(self, key, seq: int) -> None:
        try:
            buf = save_seq(self.ctx.ptr, seq)
        except RuntimeError:
            return
        n = len(buf)
        old = self._states.pop(key, None)  # the same chunk twice in one call
        self._bytes += n - (len(old) if old is not None else 0)
        self._states[key] = buf
        while self._bytes > STATE_CACHE_BYTES and len(self._states) > 1:
            _, old = self._states.popitem(last=False)
            self._bytes -= len(old)

    def _restore(self, buf, seq: int) -> bool:
        return restore_seq(self.ctx.ptr, buf, seq, clear=False)

    def forget(self) -> None:
        """Drop the kept chunk states (benchmarks time the reading itself)."""
        self._states.clear()
        self._bytes = 0

    def close(self) -> None:
        self.ctx.close()
