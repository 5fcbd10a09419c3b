"""Two runs of the same cell (the same items and prompts): per condition and slot, on how many items
the answer's text differs and on how many its verdict does. What a rebuilt llama.cpp or another
machine moves by itself, against which a difference between conditions is read.

    python -m research.rerun_diff docs/results/sealed-kv-gemma3-270m-fix-42r.jsonl docs/results/near-kv-gemma3-270m-42r.jsonl

Conditions are matched by name; a condition whose settings differ between the files (a profile
recalibrated under the same name) is not a rerun, so name only what was run alike with --conditions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .eval import load_rows, verdict


def diff(a_rows, b_rows, conditions=None) -> dict:
    """{(condition, slot): (items in both, text differs, verdict differs, correct in a, correct in b)}."""
    index = lambda rows: {(r["condition"], r["slot"], r["id"]): r for r in rows}
    a, b = index(a_rows), index(b_rows)
    out = {}
    for key in a:
        if key not in b or (conditions and key[0] not in conditions):
            continue
        ra, rb = a[key], b[key]
        if ra.get("n_tokens") != rb.get("n_tokens"):
            raise ValueError(f"{key[2]} ({key[0]}, {key[1]}) has {ra.get('n_tokens')} prompt tokens in one file "
                             f"and {rb.get('n_tokens')} in the other: not the same prompt")
        t = out.setdefault(key[:2], [0, 0, 0, 0, 0])
        t[0] += 1
        t[1] += ra["answer"] != rb["answer"]
        t[2] += verdict(ra) != verdict(rb)
        t[3] += verdict(ra) == "correct"
        t[4] += verdict(rb) == "correct"
    return {k: tuple(v) for k, v in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m research.rerun_diff", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--conditions", default=None, help="only these conditions, comma-separated")
    args = ap.parse_args(argv)
    for p in (args.a, args.b):
        if not Path(p).is_file():
            sys.exit(f"research.rerun_diff: no such file: {p}")
    conds = set(args.conditions.split(",")) if args.conditions else None
    try:
        d = diff(load_rows(args.a), load_rows(args.b), conds)
    except ValueError as e:
        sys.exit(f"research.rerun_diff: {e}")
    if not d:
        sys.exit("research.rerun_diff: the files share no (condition, slot, item)")
    print(f"{args.a} (a) against {args.b} (b)\n")
    print("| condition | slot | items in both | text differs | verdict differs | correct a | correct b |")
    print("|---|---|---|---|---|---|---|")
    for (c, s), (n, t, v, ka, kb) in d.items():
        print(f"| {c} | {s} | {n} | {t} | {v} | {ka} | {kb} |")


if __name__ == "__main__":
    main()
