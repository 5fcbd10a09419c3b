#!/usr/bin/env python3
"""Pre-processing against prefill, side by side on one ~8K-token RAG prompt (NQ passages).

Stages: entity extraction (spaCy NER + patterns + Engram-table matches), question linking,
pointer map, relevance (BM25 + entities), the rerank (the question's likelihood after each of the
best RERANK_K chunks, a decode on the model: likelihood.py), prompt render + tokenize +
alignment, bias build. Uncached: a fresh extractor and no kept rerank states. Cached: the same
chunks, a new question (chunk entities reused; the rerank runs again, but only the new question's
tokens for chunks whose states it kept). Same top: a follow-up whose best chunks are the first
question's (the first question again, its scores dropped), every state kept.
Prefill: the same prompt's tokens, vanilla, on the same model, in the same process, reps
interleaved with the pre-processing; min and median reported, and the ratios.

    .venv/bin/python scripts/bench_preprocess.py                 # SmolLM2-135M, 58 passages
    .venv/bin/python scripts/bench_preprocess.py --profile       # where the uncached time goes
    .venv/bin/python scripts/bench_preprocess.py --rerank 0      # without the rerank (`run --rerank 0`)
"""
import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # research/ (the data sets)

from engram_llama import llama_cpp  # noqa: E402,F401  (the patched libllama first)
from engram_llama import align, bias as bias_mod, pointer_map, relevance  # noqa: E402
from research import datasets  # noqa: E402
from engram_llama.chunks import Chunk  # noqa: E402
from engram_llama.extract import Extractor  # noqa: E402
from engram_llama.policy import TOP_K  # noqa: E402


RERANK = None  # --rerank: None, the default rule (relevance.rerank_count); K, the best K always; 0, none


def stages(eng, ex, question, chunks, fresh=False):
    """Run the pre-processing once, timing each stage (seconds). fresh: the rerank's kept chunk
    states are dropped too (a new document set); otherwise a follow-up question reuses them."""
    t = {}
    t0 = time.perf_counter()
    ents = ex([question] + [c.text for c in chunks])
    t["extract+link"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pm = pointer_map.build(ents[0], chunks, ents[1:], ex.table)
    t["pointer map"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scored = relevance.score(question, chunks, pm)
    t["relevance"] = time.perf_counter() - t0
    r = eng.retriever
    r._lm_cache.clear()  # scores are kept per (question, chunk): time the reading itself
    if fresh and r._likelihood is not None:
        r._likelihood.forget()
    t0 = time.perf_counter()
    if RERANK is None:  # as retrieval.rank does
        k = relevance.rerank_count(scored, relevance.RERANK_K)
    else:
        k = relevance.rerank_count(scored, RERANK, share=None, lead=None)
    scored = r.rerank(question, scored, k)
    t["rerank"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    text, spans, q_char = align.render(chunks, [c.id for c in chunks], question, eng.template, eng.llm.bos, eng.llm.eos)
    toks, pieces, n_prefix = eng.llm.tokenize(text)
    prompt = align.align(text, toks, pieces, n_prefix, spans, q_char, [c.id for c in chunks])
    t["render+tokenize+align"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bias_mod.build(prompt, relevance.select(scored, TOP_K), 4.0, "chunk", pm, question)
    t["bias"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    return t, prompt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--passages", type=int, default=58)
    ap.add_argument("-c", "--ctx-size", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-table", action="store_true", help="without the starter Engram table")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rerank", type=int, default=None, metavar="K",
                    help="chunks reread by the question's likelihood: the best K always, 0 none (default: run's rule)")
    args = ap.parse_args()
    if args.rerank is not None and args.rerank < 0:
        ap.error(f"--rerank {args.rerank}: 0 or more")
    global RERANK
    RERANK = args.rerank
    from engram_llama.cli import _open_table, default_model
    from engram_llama.runtime import EngramLlama

    table = None if args.no_table else _open_table(None)
    items = datasets.nq(ROOT.parent / "shared" / "data" / "nq-open-dev.jsonl.gz", args.passages)
    it, it2 = items[0], items[1]
    chunks = [Chunk(i, t, x) for i, (t, x) in enumerate([it.gold] + it.distractors)]
    eng = EngramLlama(args.model or default_model(), n_ctx=args.ctx_size, table=table, profile=None)
    # make it fit: drop passages from the end until the prompt leaves room to answer
    while True:
        _, prompt = stages(eng, Extractor(table=table, quiet=True), it.question, chunks)
        if len(prompt.tokens) + 64 <= eng.n_ctx:
            break
        chunks = chunks[:-1]
    print(f"model {Path(args.model or default_model()).name}, {len(chunks)} passages, prompt {len(prompt.tokens)} tokens, "
          f"table {'none' if table is None else len(table)} entities", flush=True)
    if args.profile:
        pr = cProfile.Profile()
        pr.enable()
        stages(eng, Extractor(table=table, quiet=True), it.question, chunks)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(25)
        print(s.getvalue())
        return 0
    res = {"uncached": [], "cached": [], "same top": [], "prefill": []}
    per_stage = {"uncached": [], "cached": [], "same top": []}
    for rep in range(args.reps):
        ex = Extractor(table=table, quiet=True)  # a fresh one: nothing cached
        t, _ = stages(eng, ex, it.question, chunks, fresh=True)
        res["uncached"].append(t["total"]); per_stage["uncached"].append(t)
        lk = eng.retriever._likelihood  # None while no question was reranked (a clear leader)
        before = (lk.restored, lk.read) if lk else (0, 0)
        t, _ = stages(eng, ex, it2.question, chunks)  # same chunks, a new question
        res["cached"].append(t["total"]); per_stage["cached"].append(t)
        lk = eng.retriever._likelihood
        after = (lk.restored, lk.read) if lk else (0, 0)
        print(f"rep {rep}: the new question's rerank restored {after[0] - before[0]} chunk states, "
              f"read {after[1] - before[1]}", file=sys.stderr, flush=True)
        # a follow-up whose best chunks are the first question's (all their states kept): the
        # first question again, its scores dropped so that the rerank runs
        t, _ = stages(eng, ex, it.question, chunks)
        res["same top"].append(t["total"]); per_stage["same top"].append(t)
        eng.hook.clear()
        eng.llm.clear()
        t0 = time.perf_counter()
        eng.cache.prefill(prompt.tokens, progress=False)
        res["prefill"].append(time.perf_counter() - t0)
        print(f"rep {rep}: uncached {res['uncached'][-1]:.3f}s  cached {res['cached'][-1]:.3f}s  "
              f"same top {res['same top'][-1]:.3f}s  prefill {res['prefill'][-1]:.2f}s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    print("\n| | min (s) | median (s) | median / prefill | target |")
    print("|---|---|---|---|---|")
    for k, target in (("uncached", "≤ 25%"), ("cached", "≤ 5%"), ("same top", "≤ 5%"), ("prefill", "")):
        print(f"| {k} | {min(res[k]):.3f} | {med[k]:.3f} | {100 * med[k] / med['prefill']:.1f}% | {target} |")
    print("\nper stage, median seconds (uncached / cached / same top):")
    for stage in per_stage["uncached"][0]:
        u, c, f = (statistics.median(t[stage] for t in per_stage[k]) for k in ("uncached", "cached", "same top"))
        print(f"  {stage:24} {u:.4f} / {c:.4f} / {f:.4f}")
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
