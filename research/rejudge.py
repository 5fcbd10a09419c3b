"""A second reading of the recitals in a result file (declared in docs/EVAL.md section 2 on
2026-12-06): the recital check judges a copied run alone, so an answer that gives the gold in its
own words and then copies 8+ words of the same sentence counts as degenerate. Here a copied run
is cleared when the answer holds a gold answer and the run lies inside one sentence of the
documents that holds one (the answer's own sentence, continued); every other run is judged as
before. The documents are rebuilt from the data set as the run built them. Prints, per
condition, the recitals as judged, those the second reading clears, and the accuracy per slot
with the cleared answers counted correct; the judged figures stay the primary ones.

    python -m research.rejudge FILE --dataset nq|bulletin|kv --passages N
"""
from __future__ import annotations

import argparse
import collections

from engram_llama.bias import sentences
from engram_llama.quality import _holds, _recital, copied_runs, normalize

from . import datasets
from .eval import DATASETS, SLOTS, load_rows, verdict
from .evaluate import chunked, documents


def cleared(answer: str, answers: list[str], chunk_texts: list[str], question: str) -> bool:
    """True where every copied run without a gold answer lies inside a gold-holding sentence of
    the documents and the answer itself holds a gold answer."""
    golds = [g for g in (normalize(x) for x in answers) if g]
    if not any(_holds(normalize(answer), g) for g in golds):
        return False
    sents = [f" {normalize(t[a:b])} " for t in chunk_texts for a, b in sentences(t)]
    holding = [s for s in sents if any(_holds(s, g) for g in golds)]
    runs = [r for r in copied_runs(answer, "\n".join(chunk_texts), question) if not any(_holds(r, g) for g in golds)]
    return bool(runs) and all(any(f" {r} " in s for s in holding) for r in runs)


def items_for(rows, dataset: str, passages: int):
    if dataset == "bulletin":
        seeds = {r["id"].split("-")[1] for r in rows}
        out = {}
        for seed in seeds:  # as research run built them: 4 x 100 items of the seed
            out.update({it.id: it for it in datasets.bulletin(400, passages, int(seed))})
        return out
    return {it.id: it for it in datasets.load(dataset, passages, DATASETS[dataset])}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m research.rejudge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--dataset", choices=["nq", "bulletin", "kv"], required=True)
    ap.add_argument("--passages", type=int, required=True, help="the file's passages (as its run had them)")
    a = ap.parse_args(argv)
    rows = [r for r in load_rows(a.path) if r["slot"] != "gold-only"]
    items = items_for(rows, a.dataset, a.passages)
    agree = total = 0
    recit, clear = collections.Counter(), collections.Counter()
    correct = collections.Counter()
    for r in rows:
        it = items[r["id"]]
        passages, k = documents(it, r["slot"], a.passages)
        texts = [c.text for c in chunked(passages, k)[0]]
        v = verdict(r)
        if r.get("degenerate") == "recital":
            total += 1
            agree += _recital(r["answer"], "\n".join(texts), r["answers"], r.get("question", ""))
            recit[r["condition"]] += 1
            if cleared(r["answer"], r["answers"], texts, r.get("question", "")):
                clear[r["condition"]] += 1
                v = "correct"
        correct[(r["condition"], r["slot"])] += v == "correct"
    n = collections.Counter((r["condition"], r["slot"]) for r in rows)
    print(f"{a.path}: the stored recitals found again from the rebuilt documents: {agree} of {total}\n")
    print("| condition | recitals | cleared: the answer's own sentence | correct first / middle / last, as judged "
          "| with the cleared counted correct |\n|---|---|---|---|---|")
    for c in dict.fromkeys(r["condition"] for r in rows):
        judged = " / ".join(f"{100 * sum(verdict(r) == 'correct' for r in rows if r['condition'] == c and r['slot'] == s) / max(n[(c, s)], 1):.0f}"
                            for s in SLOTS)
        second = " / ".join(f"{100 * correct[(c, s)] / max(n[(c, s)], 1):.0f}" for s in SLOTS)
        print(f"| {c} | {recit[c]} | {clear[c]} | {judged}% | {second}% |")


if __name__ == "__main__":
    main()
