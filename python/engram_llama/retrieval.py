"""Which chunks answer: score them (BM25 and shared entities), rerank the best by the question's
likelihood after each (the model's own reading), and fit the best-ranked into the context."""
from __future__ import annotations

import contextlib

import numpy as np

from . import align, pointer_map, relevance
from .chunks import Chunk
from .extract import Extractor


class ContextTooSmall(Exception):
    pass


class Retriever:
    def __init__(self, llm, extractor: Extractor | None = None, table=None):
        self.llm = llm
        self.table = table
        self.extract = extractor or Extractor(table=table)  # warns once when spaCy's model is missing
        self._likelihood = None  # made on first use: a small second context on the same weights
        self._lm_cache: dict[tuple[str, str, str], float] = {}

    def rank(self, question: str, chunks: list[Chunk], rerank_k: int | None) -> tuple[pointer_map.PointerMap, list[relevance.Scored]]:
        """rerank_k None: the default rerank (none where the best leads clearly, else RERANK_K
        within RERANK_SHARE of the text); K: the best K; 0: none."""
        ents = self.extract([question] + [c.text for c in chunks])
        pm = pointer_map.build(ents[0], chunks, ents[1:], self.table)
        scored = relevance.score(question, chunks, pm)
        if rerank_k is None:
            k = relevance.rerank_count(scored, relevance.RERANK_K)
        else:
            k = relevance.rerank_count(scored, rerank_k, share=None, lead=None)
        return pm, self.rerank(question, scored, k)

    def rerank(self, question: str, scored: list[relevance.Scored], k: int) -> list[relevance.Scored]:
        """The best k chunks reordered by score and the question's likelihood after each."""
        head = [sc.chunk for sc in scored[:k]]
        if len(head) < 2:
            return scored
        # every llama.cpp call here under a shared context's lock (serve -np): the likelihood
        # context's creation and decodes beside another sequence's decode changed the scores
        lock = getattr(self.llm, "lock", None) or contextlib.nullcontext()
        if self._likelihood is not None and self._likelihood.n_seq < k:  # one batch per call, as a fresh run
            with lock:
                self._likelihood.close()
            self._likelihood = None
        if self._likelihood is None:
            from .likelihood import QueryLikelihood

            with lock:
                self._likelihood = QueryLikelihood(self.llm.model, n_seq=k, n_threads=self.llm.n_threads)
        # a score depends on the question and the chunk's text only: the same chunks in another
        # order (reordering, another slot) are not reread
        keys = [(question, c.source, c.text) for c in head]
        if len(self._lm_cache) > 4096:  # emptied before what is cached is read, not between
            self._lm_cache.clear()
        todo = [c for c, key in zip(head, keys) if key not in self._lm_cache]
        if todo:
            with lock:
                scores = self._likelihood(question, todo)
            for c, v in zip(todo, scores):
                self._lm_cache[(question, c.source, c.text)] = float(v)
        return relevance.rerank(scored, np.array([self._lm_cache[key] for key in keys]))

    def fit(self, question: str, chunks: list[Chunk], scored: list[relevance.Scored], edges: bool,
            template: str | None, answer_prefix: str | None, room: int,
            think: bool = False, repeat: bool = False,
            history: list[dict] | None = None) -> tuple[align.Prompt, list[int], list[Chunk]]:
        """Render and align the prompt with as many chunks as fit in `room` tokens, dropping the
        worst-ranked first; edges: the kept chunks reordered, best at the ends (best last); repeat:
        the best kept chunk once more after them (its spans then are the copy's)."""
        rank = {sc.chunk.id: k for k, sc in enumerate(scored)}
        keep = [c.id for c in chunks]
        dropped: list[Chunk] = []
        past = None
        while True:
            order = relevance.edges_order(sorted(keep, key=rank.get)) if edges else keep
            if repeat and keep:
                order = order + [min(keep, key=rank.get)]
            text, spans, q_char = align.render(chunks, order, question, template, self.llm.bos, self.llm.eos,
                                               answer_prefix, think, history)
            if past is None:  # (the earlier turns come before the documents: dropping one does not move them)
                past = align.history_spans(text, history, template, self.llm.bos, self.llm.eos, think)
            toks, pieces, n_prefix = self.llm.tokenize(text, [align.user_span(chunks, order, q_char, question)] + past)
            if len(toks) <= room:
                break
            if not keep:
                raise ContextTooSmall(f"the context ({self.llm.n_ctx} tokens) is too small for the question alone "
                                      f"({len(toks)} tokens + {self.llm.n_ctx - room} to answer); raise -c")
            worst = max(keep, key=rank.get)
            keep.remove(worst)
            dropped.append(next(c for c in chunks if c.id == worst))
        return align.align(text, toks, pieces, n_prefix, spans, q_char, order), keep, dropped

    def close(self) -> None:
        if self._likelihood is not None:
            self._likelihood.close()
            self._likelihood = None
