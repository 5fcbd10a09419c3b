#!/usr/bin/env python3
"""Where relevance ranks the gold passage, without a model: the ranking that the bias and the
reordering both follow. Compares BM25 over the chunk text alone or with its source label (the
title the model reads in "Document [k] (TITLE)"), and the weight of the entity score.

    .venv/bin/python scripts/eval_relevance.py --dataset nq --passages 30 --n 100
    .venv/bin/python scripts/eval_relevance.py --dataset domain --passages 36 --n 40

The gold is put at a random slot (ties are broken by chunk order, so a fixed slot would flatter
or punish it). Results: docs/EVAL.md, "Relevance".
"""
import argparse

import numpy as np

import engram_llama  # noqa: F401  (binds the patched libllama)
from engram_llama import datasets, pointer_map, relevance
from engram_llama.chunks import Chunk
from engram_llama.evaluate import default_table
from engram_llama.extract import Extractor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="nq", choices=["nq", "kv", "domain"])
    ap.add_argument("--data", default=None, help="data file (nq: ../shared/data/nq-open-dev.jsonl.gz)")
    ap.add_argument("--passages", type=int, default=30)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    data = a.data or {"nq": "../shared/data/nq-open-dev.jsonl.gz",
                      "kv": "../shared/data/kv-retrieval-75-dev.jsonl.gz"}.get(a.dataset)
    items = datasets.load(a.dataset, a.passages, data, n_items=max(a.n, 200), seed=a.seed)
    rng = np.random.default_rng(a.seed)
    table = default_table()
    ex = Extractor(table=table)
    ranks: dict[tuple[bool, float], list[int]] = {}
    for idx in rng.permutation(len(items))[:a.n]:
        it = items[idx]
        passages = list(it.distractors[:a.passages - 1])
        g = min(int(rng.integers(0, a.passages)), len(passages))
        passages.insert(g, it.gold)
        chunks = [Chunk(k, t, x) for k, (t, x) in enumerate(passages)]
        ents = ex([it.question] + [c.text for c in chunks])
        pm = pointer_map.build(ents[0], chunks, ents[1:], table)
        for source in (False, True):
            for w in (0.0, 0.25, 0.5):
                sc = relevance.score(it.question, chunks, pm, entity_weight=w, with_source=source)
                ranks.setdefault((source, w), []).append(next(r for r, s in enumerate(sc) if s.chunk.id == g))
    print(f"{a.dataset}, {a.passages} passages, {a.n} items: where the gold passage ranks\n")
    print("| BM25 over | entity weight | top-1 | top-3 | mean rank |")
    print("|---|---|---|---|---|")
    for (source, w), v in ranks.items():
        v = np.array(v)
        print(f"| {'source + text' if source else 'text'} | {w} | {100 * (v == 0).mean():.0f}% | "
              f"{100 * (v < 3).mean():.0f}% | {v.mean():.1f} |")


if __name__ == "__main__":
    main()
