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

from engram_llama import calibrate, tasks
from engram_llama.gguf_check import identity
from engram_llama.profile import key, write


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
    if head.get("tasks_version", 1) != tasks.VERSION:  # logs before the field were version 1
        raise SystemExit(f"{a.log} was measured on tasks version {head.get('tasks_version', 1)}, not {tasks.VERSION}")
    prof = calibrate.decide(rows, calibrate.task_items(head["n_ctx"], head["seed"]), ident, head)
    prof.measured["log"] = Path(a.log).name
    prof.path = write(prof, a.out)
    print(calibrate.report(prof))
    print(f"profile: {prof.path}")


if __name__ == "__main__":
    main()
