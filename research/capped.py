"""How many answers in a results file stopped at the answer cap, per condition and slot, and how many
of those failed (wrong, a refusal, or degenerate as the report counts it): an answer cut before it
got to the point fails, whatever the steering did (a chat model that restates the question first
needs more tokens than a name).

    python -m research.capped docs/results/sealed-bulletin-smollm2-36p.jsonl --model SMOLLM2.gguf --max-new 16

Rows written since the "finish" field exist say whether they stopped at the cap ("length"). Older
rows are counted by tokenizing the stored answer again with the model's vocabulary, which only
approximates what was generated (the answer was stripped of spaces and newlines, and a text can
tokenize otherwise than it was generated): the table gives those at the cap or above and, beside
them, those one token short, of which some were cut and some ended there.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

from .eval import load_rows, verdict


def capped(rows, max_new: int, count_tokens=None) -> dict:
    """{(condition, slot): [answers, at the cap, at the cap and failed, one short, one short and
    failed]} over judged rows (eval.load_rows); count_tokens(text) is needed only for rows without a
    "finish" field (a row with one says exactly, and is never "one short")."""
    tally = {}
    for r in rows:
        if r.get("finish") is not None:
            n = max_new if r["finish"] == "length" else 0
        elif count_tokens is None:
            raise ValueError("rows without a \"finish\" field: give --model to count their tokens")
        else:
            n = count_tokens(r["answer"])
        failed = verdict(r) != "correct"
        t = tally.setdefault((r["condition"], r["slot"]), [0, 0, 0, 0, 0])
        t[0] += 1
        if n >= max_new:
            t[1] += 1
            t[2] += failed
        elif n == max_new - 1:
            t[3] += 1
            t[4] += failed
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
    rows = load_rows(a.path)
    try:
        tally = capped(rows, a.max_new, _vocab_counter(a.model) if a.model else None)
    except ValueError as e:
        sys.exit(f"research.capped: {e}")
    print(f"{a.path}: answers that stopped at {a.max_new} tokens\n")
    print("| condition | slot | answers | at the cap | of those failed | one short | of those failed |")
    print("|---|---|---|---|---|---|---|")
    order = {"gold-only": 0, "first": 1, "middle": 2, "last": 3}
    conds = list(dict.fromkeys(c for c, _ in tally))
    for c in conds:
        for s in sorted({s for c_, s in tally if c_ == c}, key=lambda s: order.get(s, 9)):
            print("| " + " | ".join([c, s, *map(str, tally[(c, s)])]) + " |")
    per = collections.Counter()
    for (c, s), t in tally.items():
        if s != "gold-only":
            per[(c, 0)] += t[2]
            per[(c, 1)] += t[2] + t[4]
    print("\nfailed at the cap over the slots (with those one short): "
          + ", ".join(f"{c} {per[(c, 0)]} ({per[(c, 1)]})" for c in conds if (c, 0) in per))

if __name__ == "__main__":
    main()
