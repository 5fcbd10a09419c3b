#!/usr/bin/env python3
"""A calibration log judged again by this version's judge and decided by this version's rule, its
table printed and its profile written: the figures of a calibration kept in docs/results stay
reproducible when the judge or the rule changes after it ran (the answers do not change).

    .venv/bin/python -m research.calibration_log docs/results/calibrate-smollm2-c4096.jsonl \
        --model SMOLLM2.gguf --out research/profiles/smollm2-135m-instruct-q4_1.json
"""
import argparse
import json
from pathlib import Path

from engram_llama import __version__, calibrate, tasks
from engram_llama.gguf_check import identity
from engram_llama.profile import Profile, key, write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log")
    ap.add_argument("--model", required=True, help="the GGUF the log was measured on (its identity goes in the profile)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    lines = Path(a.log).read_text(encoding="utf-8").splitlines()
    head, rows = json.loads(lines[0]), [json.loads(l) for l in lines[1:] if l.strip()]
    ident = identity(a.model)
    if head["model"] != key(ident):
        raise SystemExit(f"{a.log} was measured on {head['model']}, not {key(ident)}")
    n_ctx = head["n_ctx"]
    per_kind = calibrate.MAX_ITEMS // len(tasks.KINDS) + 1
    pool = {k: tasks.generate(k, per_kind, head["seed"], n_distractors=max(80, n_ctx // 40)) for k in tasks.KINDS}
    items = [pool[tasks.KINDS[i % len(tasks.KINDS)]][i // len(tasks.KINDS)] for i in range(calibrate.MAX_ITEMS)]
    rows = calibrate._rejudge(rows, items)
    pol, chosen = calibrate.choose(rows)
    measured = {
        "n_ctx": n_ctx, "prompt_tokens": [min(r["prompt_tokens"] for r in rows), max(r["prompt_tokens"] for r in rows)],
        "kinds": sorted({r["kind"] for r in rows}), "items": len({r["item"] for r in rows}), "placements": len(rows),
        "slots": list(tasks.SLOTS), "max_tokens": head["max_tokens"], "chat": head["chat"],
        "minutes": round(sum(r["seconds"] for r in rows) / 60, 1), "seed": head["seed"],
        "rule": "items' sign test vs vanilla (research.calibration_log, judged again)",
        "table": calibrate.table(rows), "chosen": chosen, "log": Path(a.log).name,
    }
    prof = Profile(pol, ident, measured, __version__)
    prof.path = write(prof, a.out)
    print(calibrate.report(prof))
    print(f"profile: {prof.path}")


if __name__ == "__main__":
    main()
