#!/usr/bin/env python3
"""Peak resident memory of a full `engram-llama run`, Engram against vanilla (--no-engram, the same
prompt without bias, so spaCy and the table are loaded in both), and against the bare model with
no extractor (llama-cpp-python alone on the same prompt), each in its own process.

    .venv/bin/python scripts/bench_memory.py                 # SmolLM2-135M, 28 NQ passages, -c 4096
    .venv/bin/python scripts/bench_memory.py --passages 58 -c 8192
"""
import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # research/ (the data sets)

BARE = r'''
import sys, engram_llama
from engram_llama import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), verbose=False)
text = open(sys.argv[3], encoding="utf-8").read()
toks = llm.tokenize(text.encode("utf-8"))[: int(sys.argv[2]) - 64]
llm.eval(toks)
'''


def peak_child_rss_mb(cmd) -> float:
    """Peak RSS of one child (run alone, so RUSAGE_CHILDREN's maximum is this child's)."""
    out = subprocess.run([sys.executable, "-c",
                          "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
                          "sys.stderr.write(r.stderr.decode()[-300:]) if r.returncode else None; "
                          "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode == 0 else -1)"]
                         + cmd, capture_output=True, text=True)
    kb = int(out.stdout.strip() or -1)
    if kb < 0:
        sys.exit(f"bench_memory: child failed: {out.stderr.strip()[-300:]}")
    return kb / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--passages", type=int, default=28)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    args = ap.parse_args()
    import engram_llama  # noqa: F401
    from research import datasets
    from engram_llama.cli import default_model

    model = args.model or default_model()
    items = datasets.nq(ROOT.parent / "shared" / "data" / "nq-open-dev.jsonl.gz", args.passages)
    it = items[0]
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as d2:
        for k, (title, text) in enumerate([it.gold] + it.distractors):
            (Path(d) / f"{k:02d}.txt").write_text(f"{title}\n\n{text}\n", encoding="utf-8")
        allt = Path(d2) / "all.txt"
        allt.write_text("\n\n".join(f"{t}\n\n{x}" for t, x in [it.gold] + it.distractors), encoding="utf-8")
        base = [sys.executable, "-m", "engram_llama.cli", "run", model, "--chunks", d, it.question, "-c", str(args.ctx_size), "-n", "16"]
        res = {
            "engram": peak_child_rss_mb(base),
            "vanilla (--no-engram)": peak_child_rss_mb(base + ["--no-engram"]),
            "bare llama-cpp-python, same text": peak_child_rss_mb([sys.executable, "-c", BARE, model, str(args.ctx_size), str(allt)]),
        }
    print(f"\nmodel {Path(model).name}, {args.passages} passages, -c {args.ctx_size}; peak RSS per process\n")
    print("| run | peak RSS (MiB) | vs vanilla |")
    print("|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v:.0f} | {v / res['vanilla (--no-engram)']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
