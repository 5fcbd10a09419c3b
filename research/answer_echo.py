"""What does a base model write after it echoes "Answer:"? On a plain prompt (`--no-chat`) Gemma-3
often answers a bare "Answer:" on a line of its own, and the answer ends at that line (docs/EVAL.md
section 4). Here the answer runs on to a blank line instead, through the product's own `ask`, so the
line after the echo can be read: is the answer there? Development items only (bulletins generated
as calibration's are, seed 0, not the sealed seed; NQ from the start of the development order).
Conditions: vanilla, the hand-tuned defaults, and calibrate's `chunk+4` (Gemma's rule-2 profile).

    .venv/bin/python -m research.answer_echo --model GEMMA.gguf --dataset bulletin --n 30 --slot last
    .venv/bin/python -m research.answer_echo --count docs/results/sealed-bulletin-gemma3-270m-fix-36p.jsonl
(--count: no model run; the bare echoes among an evaluation file's answers, and its wrong answers,
per condition and slot.)
"""
from __future__ import annotations

import argparse
import collections
import json


ECHO = "answer:"


def is_echo(text: str) -> bool:
    return text.strip().lower() == ECHO


def count(path: str) -> None:
    rows = [json.loads(l) for l in open(path, encoding="utf-8")]
    echo, wrong = collections.Counter(), collections.Counter()
    for r in rows:
        if r["slot"] == "gold-only":
            continue
        echo[r["condition"], r["slot"]] += is_echo(r["answer"])
        wrong[r["condition"], r["slot"]] += r["judge"] != "correct"
    print("| condition | slot | bare 'Answer:' | wrong |\n|---|---|---|---|")
    for c, slot in sorted(wrong):
        print(f"| {c} | {slot} | {echo[c, slot]} | {wrong[c, slot]} |")
    for c in sorted({c for c, _ in wrong}):
        print(f"| {c} | all | {sum(v for k, v in echo.items() if k[0] == c)} | "
              f"{sum(v for k, v in wrong.items() if k[0] == c)} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", metavar="FILE", help="count the echoes in an evaluation file's rows; no model run")
    ap.add_argument("--model")
    ap.add_argument("--dataset", default="bulletin", choices=["bulletin", "nq"])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--passages", type=int, default=None, help="default: 36 bulletins, 30 NQ passages")
    ap.add_argument("--slot", default="last", choices=["first", "middle", "last"])
    ap.add_argument("-c", "--ctx", type=int, default=4096)
    ap.add_argument("--out", default=None, help="rows as JSON lines")
    args = ap.parse_args(argv)
    if args.count:
        return count(args.count)
    if not args.model:
        ap.error("--model is required (or --count FILE)")
    import numpy as np

    from engram_llama import runtime
    from engram_llama.plan import Settings
    from engram_llama.runtime import EngramLlama

    from . import datasets
    from .evaluate import chunked, default_table, documents, judge, settings_of

    args.passages = args.passages or (36 if args.dataset == "bulletin" else 30)

    blank_only = runtime.stops
    runtime.stops = lambda llm, chat, think=False: [s for s in blank_only(llm, chat, think) if s != "\n"]
    items = datasets.load(args.dataset, args.passages, "../shared/data/nq-open-dev.jsonl.gz", n_items=args.n)
    order = np.random.default_rng(0).permutation(len(items))[:args.n]
    eng = EngramLlama(args.model, n_ctx=args.ctx, chat=False, table=default_table(), profile=None)
    conditions = {"vanilla": Settings(engram=False, order="keep"), "engram": Settings(),
                  "chunk+4": settings_of({"candidate": "chunk+4"}, None)}
    tally = collections.Counter()
    out = open(args.out, "w") if args.out else None
    for idx in order:
        it = items[idx]
        chunks, _ = chunked(*documents(it, args.slot, args.passages))
        for name, st in conditions.items():
            a = eng.ask(it.question, chunks, 48, answer_prefix=it.answer_prefix, settings=st)
            lines = [l.strip() for l in a.text.split("\n") if l.strip()]
            first = lines[0] if lines else ""
            echo = is_echo(first)
            after = lines[1] if echo and len(lines) > 1 else ""
            tally[name, "n"] += 1
            tally[name, "first line correct"] += judge(first, it.answers) == "correct"
            if echo:
                tally[name, "echo"] += 1
                tally[name, "echo, next line correct"] += judge(after, it.answers) == "correct"
            if out:
                out.write(json.dumps({"id": it.id, "condition": name, "text": a.text, "answers": it.answers},
                                     ensure_ascii=False) + "\n")
    eng.close()
    if out:
        out.close()
    for name in conditions:
        print(f"{name}: {tally[name, 'n']} answers; first line correct {tally[name, 'first line correct']}; "
              f"a bare 'Answer:' first {tally[name, 'echo']}, the line after it correct "
              f"{tally[name, 'echo, next line correct']}")


if __name__ == "__main__":
    main()
