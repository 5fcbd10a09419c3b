"""How much each chunk matters to the question: BM25 combined with entity overlap, the best
chunks then reranked by the question's likelihood under the model (rerank; likelihood.py).

Prototypes (pipeline issue) found that biasing only the tokens that match the question does not
help, while biasing whole relevant passages does, spread over the top few by score rather than
betting on one: so relevance is scored per chunk and the bias strength follows the score ratio.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chunks import Chunk
from .pointer_map import PointerMap


@dataclass(frozen=True)
class Scored:
    chunk: Chunk
    bm25: float
    entity: float
    score: float  # combined, in [0, 1]
    lm: float | None = None  # the question's mean log-probability per token after the chunk, if reread


def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english").stemWords


def bm25_scores(question: str, chunks: list[Chunk], with_source: bool = True, stem: bool = True) -> np.ndarray:
    """BM25 of each chunk against the question. with_source: over the chunk's source label (a
    title or file name, which the prompt shows the model) and its text: on NQ with hard
    distractors that ranks the gold first in 84-86% of prompts against 71-77% for the text alone.
    stem: Snowball-stemmed words, so "walked" finds "walk" and "towers" "tower": 84% -> 91-92%
    on the items the accuracy runs use, +1 point on 500 others (+34/-20 prompts over both
    lengths; docs/RELEVANCE.md)."""
    import bm25s

    stemmer = _stemmer() if stem else None
    texts = [f"{c.source}. {c.text}" if with_source and c.source else c.text for c in chunks]
    corpus = bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    q = bm25s.tokenize([question], stopwords="en", stemmer=stemmer, show_progress=False, return_ids=False)[0]
    # query words the corpus never saw carry no score; bm25s refuses unknown tokens
    q = [w for w in q if w in corpus.vocab]
    if not q:
        return np.zeros(len(chunks))
    return np.asarray(retriever.get_scores(q), dtype=np.float64)


# what evaluation rows record as their ranking: "r4" = r3 reranked by the question's likelihood
# (rerank, RERANK_K); "r3" = stemmed BM25 over source + text, entity weight 0.25 (rows without
# the field: r2, the same unstemmed; files without "-r2": r1, docs/EVAL.md)
RANKING = "r4"
# ranked first with r3 (docs/RELEVANCE.md): NQ 0 in 88%, 0.25 in 86-87%, 0.5 in 78%; the
# domain set's near-ties need the entities: 0 in 98%, 0.25 in 100%
ENTITY_WEIGHT = 0.25


def score(question: str, chunks: list[Chunk], pm: PointerMap, entity_weight: float = ENTITY_WEIGHT,
          with_source: bool = True, stem: bool = True) -> list[Scored]:
    """Chunks with their scores, best first."""
    b = bm25_scores(question, chunks, with_source, stem)
    e = np.array([pm.entity_score(c.id) for c in chunks], dtype=np.float64)
    bn = b / b.max() if b.max() > 0 else b
    en = e / e.max() if e.max() > 0 else e
    w = entity_weight if e.max() > 0 else 0.0
    comb = (1 - w) * bn + w * en
    order = np.argsort(-comb, kind="stable")
    return [Scored(chunks[i], float(b[i]), float(e[i]), float(comb[i])) for i in order]


# how many of the best chunks the model rereads for their question likelihood, and the weight of
# that mean log-probability per token against the [0, 1] score (docs/RELEVANCE.md)
RERANK_K = 8
LM_WEIGHT = 2.0
# by default the rerank reads at most this share of the documents' text (at least 2 chunks): the
# rereading costs about what a prefill of those tokens costs, which was 50% of a ~2K-token prompt's
# prefill at K = 8 (docs/PERFORMANCE.md); on NQ at 15 passages 2 chunks rank the gold first in 91%
# against 94% for 8 (r3: 85%); at ~8K the share still allows all 8 (docs/RELEVANCE.md)
RERANK_SHARE = 1 / 6
# by default no rerank where BM25 + entities already lead clearly: the best chunk's score ([0, 1])
# above the second's by more than this. NQ items 500-649: at 15 passages 61% of prompts reranked,
# at 58 passages 55%, the gold first as often as with every prompt reranked (91%, 94%); 0.2 would
# rerank a quarter of them but cost 3 points at 58 passages (docs/EVAL.md, "Protocol")
RERANK_LEAD = 0.5


def rerank_count(scored: list[Scored], k: int, share: float | None = RERANK_SHARE,
                 lead: float | None = RERANK_LEAD) -> int:
    """How many of the best chunks the rerank reads: k; or by default (share, lead) none where
    the best leads the second by more than `lead`, else as many of the best k as fit in `share`
    of all the chunks' characters, but at least 2."""
    k = min(k, len(scored))
    if lead is not None and len(scored) > 1 and scored[0].score - scored[1].score > lead:
        return 0
    if share is None or k <= 2:
        return k
    budget, used, n = share * sum(len(s.chunk.text) for s in scored), 0, 0
    for s in scored[:k]:
        used += len(s.chunk.text)
        if n >= 2 and used > budget:
            break
        n += 1
    return n


def rerank(scored: list[Scored], lm: np.ndarray, weight: float = LM_WEIGHT) -> list[Scored]:
    """The first len(lm) chunks reordered by score + weight * lm (lm: the question's mean
    log-probability per token after each chunk, likelihood.QueryLikelihood), the rest after them.

    The reordered chunks' scores become exp(fused - best fused), so the best is 1 and select's
    weights follow the fused order; the others keep their order below the lowest of those."""
    k = len(lm)
    if k < 2:
        return list(scored)
    head = scored[:k]
    fused = np.array([s.score for s in head]) + weight * np.asarray(lm, dtype=np.float64)
    order = np.argsort(-fused, kind="stable")
    new = np.exp(fused - fused.max())
    out = [Scored(head[i].chunk, head[i].bm25, head[i].entity, float(new[i]), float(lm[i])) for i in order]
    floor = float(new.min())
    out += [Scored(s.chunk, s.bm25, s.entity, s.score * floor, None) for s in scored[k:]]
    return out


MIN_WEIGHT = 0.05  # below this a chunk's bias is noise: it is not selected


def select(scored: list[Scored], top_k: int, margin: float | None = None) -> list[tuple[Scored, float]]:
    """The top-k chunks with positive score and their weights.

    margin None: weight s_i / s_max. Hard distractors score close to the best chunk by that ratio
    (0.5-0.8 of it), so they get most of its bias; with a margin the weight is
    exp(-(s_max - s_i) / margin) instead: the leader alone when it leads clearly, shared among
    near-ties (scores are in [0, 1], so a margin of 0.1 keeps chunks within ~0.3 of the best).
    """
    top = [s for s in scored[:top_k] if s.score > 0]
    if not top:
        return []
    smax = top[0].score
    if margin is None:
        return [(s, s.score / smax) for s in top]
    out = [(s, float(np.exp(-(smax - s.score) / margin))) for s in top]
    return [(s, w) for s, w in out if w >= MIN_WEIGHT]


def edges_order(ids_best_first: list[int]) -> list[int]:
    """Best chunks at the two ends of the context, weakest in the middle, as LangChain's
    LongContextReorder does: the best last (next to the question, where small models read
    best), the second first, and so on inwards."""
    front = ids_best_first[1::2]
    back = ids_best_first[0::2]
    return front + back[::-1]
