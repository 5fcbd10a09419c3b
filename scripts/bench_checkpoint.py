#!/usr/bin/env python3
"""A follow-up answer over cached documents against a re-prefill, side by side in one process.

One ~N-token document set (token ids drawn at random from the model's ordinary vocabulary) and
questions of 24 tokens, each answered with 16 greedy tokens under the bias (gated at the question),
through the product's cache manager:
- re-prefill: every checkpoint dropped and the cache cleared, then documents + question + answer
  (what a hybrid or sliding-window model paid for every follow-up before document checkpoints);
- follow-up: a new question on the cached documents (dense and sliding-window: cut back;
  hybrid: the recurrent state restored from its partial checkpoint, then cut back);
- switch: a question on a second document set asked about earlier, restored from its
  whole-sequence checkpoint.
Reps interleaved; medians, the ratios to the re-prefill, restore times and checkpoint bytes.

    .venv/bin/python scripts/bench_checkpoint.py                       # generated qwen35 + Gemma-3-270M, 8K
    .venv/bin/python scripts/bench_checkpoint.py --model qwen35-2b -ngl 99   # a lent GPU: the 2B shape
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from engram_llama import llama_cpp  # noqa: E402,F401  (the patched libllama first)
from engram_llama._hook import Hook, LayerKind  # noqa: E402
from engram_llama.adapter import LlamaAdapter  # noqa: E402
from engram_llama.cache import CacheManager, restore_seq  # noqa: E402
from research import synth  # noqa: E402


class Engine:
    """The model, its hook and the cache manager: what EngramLlama holds below retrieval (so the
    bench runs where spaCy and the retrieval packages are not installed, a lent GPU machine)."""

    def __init__(self, path: str, n_ctx: int, n_gpu_layers: int):
        self.llm = LlamaAdapter(path, n_ctx, n_gpu_layers=n_gpu_layers)
        self.hook = Hook(self.llm)
        self.cache = CacheManager(self.llm, self.hook)

    def close(self) -> None:
        self.llm.close()

N_QUESTION, N_ANSWER = 24, 16


def model_path(name: str) -> str:
    if name == "gemma3-270m":
        from conftest import gemma3_path

        p = gemma3_path()
        if p is None:
            sys.exit("bench_checkpoint: Gemma-3-270M is not installed (scripts/setup.sh)")
        return str(p)
    if name in synth.SHAPES:
        return str(synth.cached_model(name))
    return name


def answer(eng, docs, q):
    """Documents + question prefilled (reusing what the cache holds), then N_ANSWER greedy tokens."""
    toks = docs + q
    bias = np.zeros(len(toks), np.float32)
    bias[len(docs) // 2:len(docs) // 2 + 200] = 2.0
    soft = [i for i, k in enumerate(eng.hook.kinds) if k != LayerKind.NONE]
    eng.hook.set_layers(soft, 1.0)
    eng.hook.set_bias(bias, seq_id=0, gate=len(docs))
    try:
        reused = eng.cache.prefill(toks, docs=len(docs))
        eng.llm.eval(toks[-1:])
        for _ in range(N_ANSWER):
            eng.llm.eval([int(np.argmax(eng.llm.logits()))])
    finally:
        eng.hook.clear()
    return reused


def bench(name: str, n_docs: int, reps: int, ngl: int) -> dict:
    eng = Engine(model_path(name), n_docs + 256, ngl)
    rng = np.random.default_rng(0)
    lo, hi = (300, min(eng.llm.n_vocab, 20000)) if eng.llm.n_vocab > 1000 else (0, eng.llm.n_vocab)
    ids = lambda n: [int(t) for t in rng.integers(lo, hi, n)]  # noqa: E731
    docs_a, docs_b = ids(n_docs), ids(n_docs)
    times = {"re-prefill": [], "follow-up": [], "switch": []}

    def timed(key, docs, expect):
        t0 = time.perf_counter()
        reused = answer(eng, docs, ids(N_QUESTION))
        times[key].append(time.perf_counter() - t0)
        assert reused == expect, (key, reused, expect)

    for _ in range(reps):
        eng.cache.forget()
        eng.llm.clear()
        timed("re-prefill", docs_a, 0)          # keeps A's checkpoints
        timed("follow-up", docs_a, n_docs)
        answer(eng, docs_b, ids(N_QUESTION))    # B prefilled and kept: A's cells gone
        timed("switch", docs_a, n_docs)         # A back from its whole-sequence checkpoint
    cache = eng.cache
    full = next(iter(cache.checkpoints.values()))
    t0 = time.perf_counter()
    for _ in range(5):
        restore_seq(eng.llm.ctx, full.state)
    t_full = (time.perf_counter() - t0) / 5
    out = {"model": name, "n_docs": n_docs, "recurrent": cache.recurrent, "full_bytes": full.nbytes,
           "partial_bytes": cache._partial.nbytes if cache._partial else 0, "restore_full_s": t_full}
    if cache._partial is not None:
        t0 = time.perf_counter()
        for _ in range(5):
            restore_seq(eng.llm.ctx, cache._partial.state, partial=True)
        out["restore_partial_s"] = (time.perf_counter() - t0) / 5
    out.update({k: statistics.median(v) for k, v in times.items()})
    eng.close()
    return out


def size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="qwen35 | gemma3-270m | a synth shape | a GGUF path (repeatable)")
    ap.add_argument("--n-docs", type=int, default=8192 - 256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    args = ap.parse_args()
    print("| model | documents | re-prefill | follow-up | switch | follow-up / re-prefill | switch / re-prefill "
          "| whole checkpoint | recurrent-state checkpoint | restore (whole / partial) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.model or ["qwen35", "gemma3-270m"]:
        r = bench(name, args.n_docs, args.reps, args.n_gpu_layers)
        part = size(r["partial_bytes"]) if r["recurrent"] else "-"
        rp = f" / {r['restore_partial_s'] * 1e3:.1f} ms" if "restore_partial_s" in r else ""
        print(f"| {r['model']} | {r['n_docs']} tokens | {r['re-prefill']:.2f} s | {r['follow-up']:.3f} s "
              f"| {r['switch']:.3f} s | {r['follow-up'] / r['re-prefill']:.1%} | {r['switch'] / r['re-prefill']:.1%} "
              f"| {size(r['full_bytes'])} | {part} | {r['restore_full_s'] * 1e3:.0f} ms{rp} |", flush=True)


if __name__ == "__main__":
    main()
