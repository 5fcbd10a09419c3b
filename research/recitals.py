"""Where a condition's recitals come from in an NQ results file: the gold passage or another, how
far into the gold passage the recited run starts, and whether it starts before the answer.

    python -m research.recitals docs/results/sealed-nq-gemma3-270m-30p.jsonl [--condition calibrated]
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys

from engram_llama.quality import _RECITAL_WORDS as K, normalize

from .datasets import load_nq
from .eval import DATASETS


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m research.recitals", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--condition", default="calibrated")
    a = ap.parse_args(argv)
    raw = {it["id"]: it for it in load_nq(DATASETS["nq"])}
    src, pos, before = collections.Counter(), [], 0
    for line in open(a.path, encoding="utf-8"):
        r = json.loads(line)
        if r["condition"] != a.condition or r.get("degenerate") != "recital":
            continue
        if r["id"] not in raw:
            sys.exit(f"research.recitals: {r['id']} is not an NQ item: this reads NQ results files only")
        it = raw[r["id"]]
        g, ans = normalize(it["gold"]["text"]).split(), normalize(r["answer"]).split()
        grams = {tuple(g[i:i + K]): i for i in range(len(g) - K + 1)}
        hits = [grams[tuple(ans[i:i + K])] for i in range(len(ans) - K + 1) if tuple(ans[i:i + K]) in grams]
        if not hits:
            src["another passage"] += 1
            continue
        src["the gold passage"] += 1
        start = min(hits) / max(len(g), 1)
        pos.append(start)
        text = " ".join(g)
        locs = [text.find(normalize(x)) for x in it["answers"] if normalize(x) and normalize(x) in text]
        if locs and start < len(text[:min(locs)].split()) / max(len(g), 1):
            before += 1
    print(f"{a.condition}: {sum(src.values())} recitals, {dict(src)}")
    if pos:
        print(f"from the gold passage: start a median {100 * statistics.median(pos):.0f}% into it; "
              f"{before} of {len(pos)} start before the answer")


if __name__ == "__main__":
    main()
