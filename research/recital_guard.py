"""A recital guard, simulated on stored NQ rows: where a steered answer loops, stutters or copies
`--words` or more words of the documents (checks that need no gold answer, so `run` could make
them), take the answer of a fallback condition run on the same prompt instead. Prints correct and
degenerate answers before and after, and the guard's paired wins and losses against the steered
condition (exact McNemar). A lead for a runtime guard; nothing in the product uses it.

    python -m research.recital_guard docs/results/layers-nq-smollm2-30p.jsonl --steered engram \\
        --fallback vanilla,layers-22-29 [--words 12] [--passages 30]
"""
from __future__ import annotations

import argparse
import collections
import json

from engram_llama.quality import degenerate, judge, normalize

from .datasets import nq
from .eval import DATASETS, mcnemar


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m research.recital_guard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--steered", default="engram")
    ap.add_argument("--fallback", default="vanilla", help="conditions, comma-separated")
    ap.add_argument("--words", type=int, default=12, help="a copied run of this many words fires the guard")
    ap.add_argument("--passages", type=int, default=30, help="the file's passages (to rebuild its documents)")
    a = ap.parse_args(argv)
    items = {it.id: it for it in nq(DATASETS["nq"], a.passages)}
    docs = {i: "\n".join([it.gold[1]] + [d[1] for d in it.distractors]) for i, it in items.items()}
    grams: dict[str, set] = {}

    def copies(r) -> bool:
        if r["id"] not in grams:
            g = set()
            for t in docs[r["id"]].split("\n"):
                w = normalize(t).split()
                g.update(tuple(w[i:i + a.words]) for i in range(len(w) - a.words + 1))
            grams[r["id"]] = g
        w = normalize(r["answer"]).split()
        return any(tuple(w[i:i + a.words]) in grams[r["id"]] for i in range(len(w) - a.words + 1))

    by = collections.defaultdict(dict)
    for line in open(a.path, encoding="utf-8"):
        r = json.loads(line)
        if r["slot"] != "gold-only":
            by[(r["id"], r["slot"])][r["condition"]] = r
    verdict = lambda r: judge(r["answer"], r["answers"], docs[r["id"]], r.get("question", ""))  # noqa: E731
    for fb in a.fallback.split(","):
        n = fired = w = l = 0
        before, after, net = collections.Counter(), collections.Counter(), collections.Counter()
        for (item, _), c in by.items():
            if a.steered not in c or fb not in c:
                continue
            s = c[a.steered]
            hit = degenerate(s["answer"], None, [], s.get("question", "")) is not None or copies(s)
            g = c[fb] if hit else s
            vs, vg = verdict(s), verdict(g)
            n, fired = n + 1, fired + hit
            before[vs] += 1
            after[vg] += 1
            w += vg == "correct" and vs != "correct"
            l += vs == "correct" and vg != "correct"
            net[item] += (vg == "correct") - (vs == "correct")
        print(f"{a.steered} -> {fb} where it fires ({a.words}+ words copied, or a loop): {n} placements, fired on "
              f"{fired}; correct {before['correct']} -> {after['correct']}, degenerate {before['degenerate']} -> "
              f"{after['degenerate']}; the guard against {a.steered} +{w}/-{l} (p = "
              f"{mcnemar(sum(v > 0 for v in net.values()), sum(v < 0 for v in net.values())):.3f}, items by their net)")


if __name__ == "__main__":
    main()
