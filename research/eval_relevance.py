#!/usr/bin/env python3
"""Where relevance ranks the gold passage, without a model: the ranking that the bias and the
reordering both follow. Compares BM25 over the chunk text alone or with its source label (the
title the model reads in "Document [k] (TITLE)"), stemmed or not, and the weight of the entity score.

    .venv/bin/python -m research.eval_relevance --dataset nq --passages 30 --n 100
    .venv/bin/python -m research.eval_relevance --dataset domain --passages 36 --n 40
    .venv/bin/python -m research.eval_relevance --dataset nq --passages 58 --items 500-650 --model GEMMA.gguf

--model adds the shipped ranking (r4): the best RERANK_K chunks reranked by the question's
likelihood under that model (likelihood.py), against r3 paired per prompt.

The gold is put at a random slot (ties are broken by chunk order, so a fixed slot would flatter
or punish it). Results: docs/RELEVANCE.md.
"""
import argparse

import numpy as np

from engram_llama import llama_cpp  # noqa: F401  (the patched libllama first)
from engram_llama import pointer_map, relevance
from research import datasets
from engram_llama.chunks import Chunk
from research.evaluate import default_table
from engram_llama.extract import Extractor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="nq", choices=["nq", "kv", "domain"])
    ap.add_argument("--data", default=None, help="data file (nq: ../shared/data/nq-open-dev.jsonl.gz)")
    ap.add_argument("--passages", type=int, default=30)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="GGUF model for the rerank by question likelihood (r4)")
    ap.add_argument("--rerank", type=int, default=relevance.RERANK_K, help="chunks reread (default RERANK_K)")
    ap.add_argument("--items", default=None, metavar="A-B",
                    help="items A..B-1 in file order instead of --n drawn at random (e.g. 500-1000: none "
                         "of them is in an accuracy run)")
    a = ap.parse_args()
    data = a.data or {"nq": "../shared/data/nq-open-dev.jsonl.gz",
                      "kv": "../shared/data/kv-retrieval-75-dev.jsonl.gz"}.get(a.dataset)
    items = datasets.load(a.dataset, a.passages, data, n_items=max(a.n, 200), seed=a.seed)
    rng = np.random.default_rng(a.seed)
    if a.items:
        try:
            lo, hi = (int(x) for x in a.items.split("-"))
        except ValueError:
            ap.error(f"--items {a.items!r}: give A-B, e.g. 500-1000")
        pick = np.arange(lo, min(hi, len(items)))
    else:
        pick = rng.permutation(len(items))[:a.n]
    table = default_table()
    ex = Extractor(table=table)
    scorer = None
    if a.model:
        from engram_llama.likelihood import QueryLikelihood
        from engram_llama.lowlevel import Model

        model = Model(a.model)
        scorer = QueryLikelihood(model.ptr, n_seq=a.rerank)
    r4: list[int] = []
    gated: list[tuple[float, bool, bool]] = []  # r3's lead of its first over its second, r3 right, r4 right
    sweep: dict[tuple[int, float], list[bool]] = {}
    ranks: dict[tuple[bool, bool, float], list[int]] = {}
    variants = [(False, False, 0.25)] + [(True, stem, w) for stem in (False, True) for w in (0.0, 0.25, 0.5)]
    for idx in pick:
        it = items[idx]
        passages = list(it.distractors[:a.passages - 1])
        g = min(int(rng.integers(0, a.passages)), len(passages))
        passages.insert(g, it.gold)
        chunks = [Chunk(k, t, x) for k, (t, x) in enumerate(passages)]
        ents = ex([it.question] + [c.text for c in chunks])
        pm = pointer_map.build(ents[0], chunks, ents[1:], table)
        for source, stem, w in variants:
            sc = relevance.score(it.question, chunks, pm, entity_weight=w, with_source=source, stem=stem)
            ranks.setdefault((source, stem, w), []).append(next(r for r, s in enumerate(sc) if s.chunk.id == g))
            if scorer is not None and (source, stem, w) == (True, True, relevance.ENTITY_WEIGHT):
                head = [s.chunk for s in sc[:a.rerank]]
                lm = scorer(it.question, head)
                rr = relevance.rerank(sc, lm)
                r4.append(next(r for r, s in enumerate(rr) if s.chunk.id == g))
                gated.append((sc[0].score - sc[1].score, sc[0].chunk.id == g, rr[0].chunk.id == g))
                # the choice of K and weight: the same scores, fewer chunks reread or another weight
                for k in sorted({2, 3, 4, 5, a.rerank}):
                    for lw in (0.5, 1.0, 2.0, 3.0, 5.0):
                        top = relevance.rerank(sc, lm[:k], weight=lw)[0].chunk.id
                        sweep.setdefault((k, lw), []).append(top == g)
    print(f"{a.dataset}, {a.passages} passages, {len(pick)} items"
          f"{f' ({a.items})' if a.items else ''}: where the gold passage ranks\n")
    print("| BM25 over | stemmed | entity weight | top-1 | top-3 | mean rank |")
    print("|---|---|---|---|---|---|")
    for (source, stem, w), v in ranks.items():
        v = np.array(v)
        print(f"| {'source + text' if source else 'text'} | {'yes' if stem else 'no'} | {w} | {100 * (v == 0).mean():.0f}% | "
              f"{100 * (v < 3).mean():.0f}% | {v.mean():.1f} |")
    # the shipped ranking against the previous one, paired per prompt
    r2, r3 = np.array(ranks[(True, False, 0.25)]), np.array(ranks[(True, True, 0.25)])
    if r4:
        v = np.array(r4)
        print(f"| r3 reranked by question likelihood, top {a.rerank} (r4) | yes | {relevance.ENTITY_WEIGHT} | "
              f"{100 * (v == 0).mean():.0f}% | {100 * (v < 3).mean():.0f}% | {v.mean():.1f} |")
    print(f"\nstemmed (r3) against unstemmed (r2), entity weight 0.25, gold first: "
          f"+{int(((r3 == 0) & (r2 != 0)).sum())}/-{int(((r2 == 0) & (r3 != 0)).sum())} of {len(r2)} prompts")
    if r4:
        v = np.array(r4)
        print(f"reranked (r4) against r3, gold first: +{int(((v == 0) & (r3 != 0)).sum())}/"
              f"-{int(((r3 == 0) & (v != 0)).sum())} of {len(v)} prompts")
        print(f"gold among the {a.rerank} reread (the ceiling of the rerank): {100 * (r3 < a.rerank).mean():.0f}%")
        print("\nthe rerank skipped where r3's best leads its second by more than m (scores in [0, 1]):\n")
        print("| m | prompts reranked | gold first |")
        print("|---|---|---|")
        for m in (0.05, 0.1, 0.2, 0.3, 0.5, 1.01):
            run = [lead <= m for lead, _, _ in gated]
            ok = [r4ok if go else r3ok for (lead, r3ok, r4ok), go in zip(gated, run)]
            print(f"| {m:g} | {100 * np.mean(run):.0f}% | {100 * np.mean(ok):.0f}% |")
        print("\ngold first, by chunks reread (rows) and weight of the question's likelihood (columns):\n")
        ws = sorted({lw for _, lw in sweep})
        print("| reread | " + " | ".join(f"{lw:g}" for lw in ws) + " |")
        print("|---|" + "---|" * len(ws))
        for k in sorted({k for k, _ in sweep}):
            print(f"| {k} | " + " | ".join(f"{100 * np.mean(sweep[(k, lw)]):.0f}%" for lw in ws) + " |")


if __name__ == "__main__":
    main()

