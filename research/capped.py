"""How many answers in a results file stopped at the answer cap, per condition and slot, and how many
of those were judged wrong: an answer cut before it got to the point reads as wrong, whatever the
steering did (a chat model that restates the question first needs more tokens than a name).

    python -m research.capped docs/results/sealed-bulletin-smollm2-36p.jsonl --model SMOLLM2.gguf --max-new 16

Rows written since the "finish" field exist say whether they stopped at the cap ("length"); older rows
are counted by tokenizing the answer again with the model's vocabulary, at or above the cap (a lower
bound: the stored answer is stripped of spaces, which can hide one token).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from .evaluate import judge


def capped(rows, max_new: int, count_tokens=None) -> dict:
    """{(condition, slot): [answers, at the cap, at the cap and wrong]}; count_tokens(text) is
    needed only for rows without a "finish" field."""
    tally = {}
    for r in rows:
        if "finish" in r and r["finish"] is not None:
            at_cap = r["finish"] == "length"
        elif count_tokens is None:
            raise ValueError("rows without a \"finish\" field: give --model to count their tokens")
        else:
            at_cap = count_tokens(r["answer"]) >= max_new
        t = tally.setdefault((r["condition"], r["slot"]), [0, 0, 0])
        t[0] += 1
        t[1] += at_cap
        t[2] += at_cap and judge(r["answer"], r["answers"]) != "correct"
    return tally


def _vocab_counter(model: str):
    import engram_llama.adapter  # noqa: F401  (loads the patched libllama before llama_cpp)
    from llama_cpp import Llama

    llm = Llama(model, vocab_only=True, verbose=False)
    return lambda text: len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m research.capped", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--max-new", type=int, required=True, help="the cap the file was run with")
    ap.add_argument("--model", default=None, help="the GGUF the file was run with (for rows without \"finish\")")
    a = ap.parse_args(argv)
    if not Path(a.path).is_file():
        sys.exit(f"research.capped: no such file: {a.path}")
    if a.model and not Path(a.model).is_file():
        sys.exit(f"research.capped: no such model: {a.model}")
    rows = [json.loads(l) for l in Path(a.path).read_text(encoding="utf-8").splitlines() if l.strip()]
    try:
        tally = capped(rows, a.max_new, _vocab_counter(a.model) if a.model else None)
    except ValueError as e:
        sys.exit(f"research.capped: {e}")
    print(f"{a.path}: answers that stopped at {a.max_new} tokens\n")
    print("| condition | slot | answers | at the cap | of those wrong |\n|---|---|---|---|---|")
    order = {"gold-only": 0, "first": 1, "middle": 2, "last": 3}
    conds = list(dict.fromkeys(c for c, _ in tally))
    for c in conds:
        for s in sorted({s for c_, s in tally if c_ == c}, key=lambda s: order.get(s, 9)):
            n, k, w = tally[(c, s)]
            print(f"| {c} | {s} | {n} | {k} | {w} |")
    per = collections.Counter()
    for (c, s), (n, k, w) in tally.items():
        if s != "gold-only":
            per[c] += w
    print("\nwrong at the cap, every slot: " + ", ".join(f"{c} {per[c]}" for c in conds if c in per))


if __name__ == "__main__":
    main()
