"""A fixed 20-item NQ slice through `EngramLlama.ask` with the shipped defaults: answers, bias spans,
strength and order, to check that a restructuring changed nothing a user gets.

    python -m research.slice_check --out /tmp/after.jsonl --against /tmp/before.jsonl

The slice: the first 20 NQ items of ../shared/data, 15 passages each (the item's gold passage at
the middle, 14 hard BM25 distractors; ~2K tokens), SmolLM2-135M-Instruct, -n 16, the starter table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--against", help="an earlier run's file: print how many rows are the same")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "nq-open-dev.jsonl.gz"))
    args = ap.parse_args(argv)
    from engram_llama.chunks import Chunk
    from engram_llama.cli import _open_table, default_model
    from engram_llama.runtime import EngramLlama

    from . import datasets

    items = datasets.nq(args.data, 15)[:20]
    eng = EngramLlama(default_model(), n_ctx=4096, table=_open_table(None), profile=None)
    old = {}
    if args.against:
        old = {r["id"]: r for r in map(json.loads, Path(args.against).read_text().splitlines())}
    same = 0
    with open(args.out, "w") as f:
        for it in items:
            passages = list(it.distractors[:14])
            passages.insert(7, it.gold)
            a = eng.ask(it.question, [Chunk(i, t, x) for i, (t, x) in enumerate(passages)], max_tokens=16)
            rec = {"id": it.id, "question": it.question, "answer": a.text, "n_tokens": a.n_prompt_tokens,
                   "order": a.order, "strength": a.strength,
                   "spans": [[s.chunk_id, list(s.tokens), round(s.value, 4)] for s in a.spans]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            o = old.get(it.id)
            ok = o is not None and all(o[k] == rec[k] for k in ("answer", "order", "strength", "spans"))
            same += ok
            print(it.id, "same" if ok else "DIFFERENT" if o else "", repr(a.text), flush=True)
    eng.close()
    if args.against:
        print(f"{same} of {len(items)} the same as {args.against}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
