#!/usr/bin/env python3
"""Accuracy evaluation on NQ-Open with hard BM25 distractors (resumable; results as JSONL).

    .venv/bin/python scripts/eval.py run --n 40 --out results/nq-smollm2.jsonl          # main conditions
    .venv/bin/python scripts/eval.py run --n 40 --out results/nq-smollm2.jsonl --preset ablation
    .venv/bin/python scripts/eval.py report results/nq-smollm2.jsonl
    .venv/bin/python scripts/eval.py plot results/nq-smollm2.jsonl -o docs/eval-nq-smollm2.png

A fast development subset: --n 5 --passages 8 (a few minutes on 2 cores).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

try:
    import engram_llama  # noqa: E402,F401  (binds the patched libllama)
except ImportError as e:  # the patched library not built: one line, as the CLI says it
    sys.exit(f"eval.py: {e}")
from engram_llama.evaluate import Condition, run  # noqa: E402

# strength 0: the shipped default (by prompt length, runtime.auto_strength); the 2K and 4K files
# of docs/EVAL.md were written with "engram"/"oracle" at a fixed +2 (each row records its strength)
PRESETS = {
    "main": [Condition("vanilla", "none"), Condition("engram", strength=0), Condition("oracle", "oracle", strength=0)],
    "ablation": [Condition("engram s1", strength=1.0), Condition("engram s3", strength=3.0),
                 Condition("engram s4", strength=4.0), Condition("engram all-layers", layers="all"),
                 Condition("engram top1", top_k=1), Condition("engram top5", top_k=5),
                 Condition("engram sentence", granularity="sentence"), Condition("engram entity", granularity="entity"),
                 Condition("oracle s3", "oracle", strength=3.0)],
}
PRESETS["all"] = PRESETS["main"] + PRESETS["ablation"]
# longer contexts: is it strength? (adds to a main-preset file)
PRESETS["strength"] = [Condition("engram s3", strength=3.0), Condition("engram s4", strength=4.0),
                       Condition("oracle s4", "oracle", strength=4.0)]
# the baseline a RAG user reaches for first: best chunks at the edges, no bias; and Engram on top
PRESETS["reorder"] = [Condition("reorder", "none", order="edges"), Condition("reorder+engram", strength=0, order="edges")]
PRESETS["gate"] = [Condition("engram no-gate", strength=0, gate=False)]
# beyond 4K: is the default strength (+4 from 4K on) still enough?
PRESETS["long"] = [Condition("engram s6", strength=6.0), Condition("oracle s6", "oracle", strength=6.0)]
# +3/+4 help the middle but cost the last slot at 2K and 4K, where +2 does not: keep +2 next to
# the question and ramp up to the length's strength further away (bias.chunk_strength)
PRESETS["near"] = [Condition("engram near2", strength=0, near=2.0),
                   Condition("reorder+engram near2", strength=0, order="edges", near=2.0)]
# is the length's strength right for this model? (+2 flat, +6), and the lightest touch on top of
# reordering (+1 on its best chunk, which sits last)
PRESETS["probe"] = [Condition("engram s2", strength=2.0), Condition("oracle s2", "oracle", strength=2.0),
                    Condition("engram s6", strength=6.0), Condition("reorder+engram s1 top1", strength=1.0, top_k=1,
                                                                    order="edges")]
# which chunks get the bias: hard distractors score 0.5-0.8 of the gold by the score ratio, so
# top-3 spreads the bias over them; the leader alone, or weights that fall off with the margin
PRESETS["select"] = [Condition("engram top1", strength=0, top_k=1), Condition("engram margin", strength=0, margin=0.1),
                     Condition("reorder+engram top1", strength=0, top_k=1, order="edges"),
                     Condition("reorder+engram margin", strength=0, margin=0.1, order="edges")]
# reordering and a light bias on its best chunk (which it puts last, next to the question): one
# prefill per item, as the order does not depend on the gold's slot. "+1 on top-1" was chosen on
# Gemma-3-270M at 8K (9 items); items after those are its held-out test
PRESETS["edges"] = [Condition("reorder", "none", order="edges"),
                    Condition("reorder+engram s1 top1", strength=1.0, top_k=1, order="edges"),
                    Condition("reorder+engram s2 top1", strength=2.0, top_k=1, order="edges"),
                    Condition("reorder+engram s1", strength=1.0, order="edges")]
PRESETS["full"] = PRESETS["main"] + PRESETS["reorder"] + PRESETS["near"] + PRESETS["probe"]
# the target's own table (vanilla, the defaults in both orders, the oracle, reordering) and, for
# sets where relevance is near perfect (the domain set, KV), which part of the default misses:
# strength (+2 vs the length's), the chunks it spreads over (top-1, margin weights), near-question ramp
PRESETS["target"] = PRESETS["main"] + [
    Condition("reorder", "none", order="edges"), Condition("reorder+engram s1 top1", strength=1.0, top_k=1, order="edges"),
    Condition("engram s2", strength=2.0), Condition("oracle s2", "oracle", strength=2.0),
    Condition("engram top1", strength=0, top_k=1), Condition("engram top1 s2", strength=2.0, top_k=1),
    Condition("engram margin", strength=0, margin=0.1), Condition("engram near2", strength=0, near=2.0),
    Condition("engram top1 near2", strength=0, top_k=1, near=2.0)]
# ~8K: the shipped default against vanilla and reordering, its ceiling with perfect relevance
# (the oracle with the same ramp), and a strength that keeps rising to +6 at the prompt's start
# (the ~4K trough moved to the first slot, farthest from the question)
PRESETS["far"] = [Condition("vanilla", "none"), Condition("engram top1 near2", strength=0, top_k=1, near=2.0),
                  Condition("oracle near2", "oracle", strength=0, near=2.0),
                  Condition("engram top1 near2 far6", strength=0, top_k=1, near=2.0, far=6.0),
                  Condition("oracle near2 far6", "oracle", strength=0, near=2.0, far=6.0),
                  Condition("reorder", "none", order="edges"),
                  Condition("reorder+engram s1 top1", strength=1.0, top_k=1, order="edges"),
                  # the base Gemma-3-270M at ~8K copies the biased passage's opening at +4: lighter
                  # (+2, +1 flat) and narrower (the sentences that share words with the question)
                  Condition("engram top1 s2", strength=2.0, top_k=1), Condition("engram top1 s1", strength=1.0, top_k=1),
                  Condition("engram top1 sentence near2", strength=0, top_k=1, near=2.0, granularity="sentence"),
                  # or the question's queries only: the bias lifted once the prompt is read
                  Condition("engram top1 near2 lift", strength=0, top_k=1, near=2.0, lift=True),
                  # or not on the default's last layer (Gemma-3-270M: global layers 5, 11, 17 of 18)
                  Condition("engram top1 near2 early", strength=0, top_k=1, near=2.0, layers="early"),
                  Condition("engram top1 near2 last", strength=0, top_k=1, near=2.0, layers="last")]
# the passage's opening left unbiased (bias.build "body"): do the models stop reciting it?
PRESETS["body"] = [Condition("vanilla", "none"), Condition("engram top1 near2", strength=0, top_k=1, near=2.0),
                   Condition("engram top1 near2 body", strength=0, top_k=1, near=2.0, granularity="body"),
                   Condition("oracle near2 body", "oracle", strength=0, near=2.0, granularity="body")]
# the target's core conditions alone (the default, its oracle, reordering), for slow sets
PRESETS["core"] = [c for c in PRESETS["far"] if c.name in (
    "vanilla", "engram top1 near2", "oracle near2", "reorder", "reorder+engram s1 top1")]
# the strength set per layer from the attention the top chunk already gets (probe.py): a target
# share of the question's attention instead of a logit offset (recitation: near chunks over-steered)
PRESETS["mass"] = [Condition(f"engram top1 mass{t}", strength=0, top_k=1, target=t / 100) for t in (15, 20, 30)]
# per layer, the layers that already read the chunk get least (KV: first slot lost at the default's
# mean strength): one strength for all layers, from the share averaged over them
PRESETS["massavg"] = [Condition(f"engram top1 massavg{t}", strength=0, top_k=1, target=t / 100, per_layer=False)
                      for t in (20, 40, 60)]
# the mean over heads hides the few heads that retrieve (no one target fit NQ and KV): the share
# of the head that reads the chunk most, averaged over the layers, one strength for all layers
PRESETS["masshead"] = [Condition(f"engram top1 masshead{t}", strength=0, top_k=1, target=t / 100, per_layer=False,
                                 heads=1) for t in (30, 50, 70)]
# KV needs more share than NQ (massavg 60% against 20%): a target relative to the other chunk the
# question reads most (e^margin times its share), and the default's ramp rising to +5 instead of
# the length's strength (KV's middle needed ~4.8; NQ's first and middle took 4.4-6 without loss)
RAMP5 = Condition("engram top1 near2 s5", strength=5.0, top_k=1, near=2.0)
PRESETS["rival"] = [Condition(f"engram top1 rival{m}", strength=0, top_k=1, rival=float(m)) for m in (1, 2, 3)] + [RAMP5]
# the near ramp rising to +5 (KV in the given order: 100 / 83 / 83 against the default's 100 / 17 / 83)
PRESETS["ramp5"] = [RAMP5]
PRESETS["ramp5mass"] = PRESETS["ramp5"] + [c for c in PRESETS["massavg"] if c.name == "engram top1 massavg20"]
# +5 lifts the middle everywhere but costs the first slot (Gemma NQ, SmolLM2 domain): the edges are
# read already (primacy and recency), so a profile that peaks in the middle: +2 at the question,
# +5 a quarter of the prompt away, back down to +4 at the prompt's first token
PRESETS["hump"] = [Condition("engram top1 near2 s5 far4", strength=5.0, top_k=1, near=2.0, far=4.0)]
# the same shape scaled with the length: +2 at the question, the length's strength + 1 a quarter of
# the prompt away, back to the length's strength at the start (what the default gives the first slot)
PRESETS["peak"] = [Condition("engram top1 near2 peak1", strength=0, top_k=1, near=2.0, peak=1.0)]
# KV's middle needs ~+5 (peak1: +4.2 there, 50%), the first slot no more than the length's strength
# (hump: ~+4.0 at 3.4-3.6K lost two Gemma answers): +2 at the question rising to +5 a quarter of the
# prompt away, +5 to its middle, then down to the length's strength at the first token
PRESETS["mid5"] = [Condition("engram top1 near2 mid5", strength=0, top_k=1, near=2.0, mid=5.0)]
PRESETS["coremid"] = PRESETS["core"] + PRESETS["mid5"]  # ~2K and ~8K: in one prefill per prompt
# +5 in the middle over-steers on the ~1.5K embedded sample: the middle's strength growing with the
# length. First +2 at 1K rising to +5 at ~2.9K (mid1k: the sample got +3.0 and answered the MGNREGA
# question, but recited at +2.35 on the Ayushman Bharat one); now +2 up to 1.5K, +5 from 3K
# (runtime.mid_strength; equal to mid5 from 3K)
# KV with the key restated, Gemma's last slot: the model copies the key, which the record shares with
# the question; lifted with the record, the echo is what gets copied (more at +6 and +9). The
# record less its echoes of the question (bias.echoes, runs of 3+ tokens), at the default's ramp
# and flat +6
PRESETS["novel"] = [Condition("engram top1 near2 novel", strength=0, top_k=1, near=2.0, granularity="novel", echo_run=3),
                    Condition("engram top1 s6 novel", strength=6.0, top_k=1, granularity="novel", echo_run=3)]
# the same on the other sets, each model's default with novel spans: Gemma's flat ramp, SmolLM2's
# middle by length below 6144 tokens
PRESETS["novelgemma"] = PRESETS["novel"][:1]
PRESETS["novelsmol"] = [Condition("engram top1 near2 midauto novel", strength=0, top_k=1, near=2.0, mid="auto",
                                  granularity="novel", echo_run=3)]
# novel costs KV's first and middle slots a little (75% -> 67%, 92% -> 75%): is it the question's
# queries that need the key to find the record? The whole chunk for them and the novel spans from
# the question's end on (the answer prefix, the answer)
PRESETS["novelans"] = [Condition("engram top1 near2 novel-answer", strength=0, top_k=1, near=2.0,
                                 answer_granularity="novel", echo_run=3)]
# runs of 3-5 tokens are the names NQ's questions are about (none of 6+ in 80 gold passages), and
# unbiasing them cost NQ three answers on Gemma: echoes from 6 tokens (bias.ECHO_RUN), the keys,
# codes and restated phrases; each model's default with them (SmolLM2 from 6144: the move + 2)
PRESETS["novel6gemma"] = [Condition("engram top1 near2 novel6", strength=0, top_k=1, near=2.0, granularity="novel",
                                    echo_run=6)]
# Gemma KV ~6.1K with the key restated, n = 12: the last slot (58%) under the middle (83%): the near
# ramp gives the record next to the question +2 only; with the key unbiased (novel spans) more may copy
PRESETS["novelnear"] = [Condition(f"engram top1 near{n} novel6", strength=0, top_k=1, near=float(n), granularity="novel",
                                  echo_run=6) for n in (3, 4)]
PRESETS["novel6smol"] = [Condition("engram top1 near2 midauto novel6", strength=0, top_k=1, near=2.0, mid="auto",
                                   granularity="novel", echo_run=6)]
PRESETS["novel6move"] = [Condition("move top1 + engram s2 novel6", strength=2.0, top_k=1, move=True,
                                   granularity="novel", echo_run=6)]
# KV with "Answer:" at 75 records on Gemma-3-270M: the default (novel spans) against vanilla and reordering
PRESETS["kvnovel"] = [c for c in PRESETS["core"] if c.name in ("vanilla", "reorder")] + PRESETS["novel6gemma"]
# the move's first slot on the domain set (17% at ~4.6K and ~7.6K, the given order 83% / 33%): the moved
# chunk's cells were computed where it was read; read again at the end instead (a chunk's prefill)
PRESETS["reread"] = [Condition("move top1 + engram s2 novel6 reread", strength=2.0, top_k=1, move=True,
                               granularity="novel", echo_run=6, reread="always")]
PRESETS["rereadpair"] = PRESETS["novel6move"] + PRESETS["reread"]  # the shift beside it, on one prefill
# read again only when the moved chunk is the documents' first (the first slot's stale cells; the middle
# lost by reading again): where the gold ranks first this is the reread row at the first slot and the
# shift's elsewhere (`report --compose` puts those together; this runs the prompts it cannot decide)
PRESETS["rereadfirst"] = [Condition("move top1 + engram s2 novel6 reread first", strength=2.0, top_k=1, move=True,
                                    granularity="novel", echo_run=6, reread="first")]
PRESETS["mid1k"] = [Condition("engram top1 near2 mid1k", strength=0, top_k=1, near=2.0, mid=(1024, 2896.31))]
PRESETS["midauto"] = [Condition("engram top1 near2 midauto", strength=0, top_k=1, near=2.0, mid="auto")]
# SmolLM2 ~8K: the first slot does not move under any strength on the second half's layers (the
# oracle neither): the default's profile on every layer (run with --slots first)
PRESETS["midautoall"] = [Condition("engram top1 near2 midauto all-layers", strength=0, top_k=1, near=2.0, mid="auto",
                                   layers="all")]
# SmolLM2 ~8K: the first slot stays at 17% under the default's +4 there, while mass20 (per layer
# 5.9-7.9 on the first chunk) answered 42%: the first chunk's strength alone, the near ramp and the
# middle as the default's (+5 from a quarter of the prompt away), rising to X at the first token
PRESETS["farsweep"] = [Condition(f"engram top1 near2 s5 far{x}", strength=5.0, top_k=1, near=2.0, far=float(x))
                       for x in (5, 6, 7, 8)]
# +6 to +8 on the first chunk answered 33% there and recited the passage's opening: a large lift puts
# the chunk over the question and the answer so far. Instead the other chunks pushed down (X < 0),
# the chunk itself unbiased or at the default's profile
# (strength 1e-9: the chunk at 0, as 0 means "by length")
PRESETS["suppress"] = [Condition("engram top1 s0 others-4", strength=1e-9, top_k=1, others=-4.0),
                       Condition("engram top1 s0 others-8", strength=1e-9, top_k=1, others=-8.0),
                       Condition("engram top1 near2 midauto others-4", strength=0, top_k=1, near=2.0, mid="auto",
                                 others=-4.0)]
# the bias lifts the first chunk to 33% at most (farsweep) while reordering reaches 58-75%: is it the
# chunk's position? The top chunk moved to the end of the documents in the cache (Runner.move: the
# cells' positions shifted, no second prefill), alone and with reordering's +1
PRESETS["move"] = [Condition("move top1", strength=0, top_k=1, move=True),
                   Condition("move top1 + engram s1", strength=1.0, top_k=1, move=True)]
# n = 12 left one item between the target and a miss at ~8K: the next items with the core table,
# the default and the move, in one prefill per prompt
PRESETS["movecore"] = PRESETS["core"] + PRESETS["midauto"] + PRESETS["move"]
# the domain set lost 16 answers to 1 under move + 1 at ~4.6K (reordering + 1 lost as much): the same at
# ~8K, with +2 on the moved chunk (the given order's strength next to the question) beside +1
PRESETS["movedomain"] = [c for c in PRESETS["core"] if c.gate and c.order == "keep"] + PRESETS["midauto"] + \
    PRESETS["move"][1:] + [Condition("move top1 + engram s2", strength=2.0, top_k=1, move=True)]
# +2 on the moved chunk (ahead of +1 on the domain set at ~7.6K: +4/-1 after 8 items, +10/-2 at 12),
# alone (NQ ~8K) and with the core table, the given order's default and the move (KV, 75 records)
PRESETS["move2"] = PRESETS["movedomain"][-1:]
PRESETS["movecore2"] = PRESETS["movecore"] + PRESETS["move2"]
# below MOVE_FROM (6144): the move alone, with +1 and with +2 (the strength that ships) at ~4K and ~2K
PRESETS["moveall"] = PRESETS["move"] + PRESETS["move2"]
# Gemma-3-270M on KV answers with the record first only (the flat ramp, 48 records): is it strength
# (+6, +9 flat) or layers (the default profile on every softmax layer, local ones too)?
PRESETS["kvgemma"] = [Condition(f"engram top1 s{x}", strength=float(x), top_k=1) for x in (6, 9)] + \
    [Condition("engram top1 near2 all-layers", strength=0, top_k=1, near=2.0, layers="all")]
# with the key restated (--restate-key) the profile on every layer answered 58% at the last slot where
# the global layers alone gave 33% (+6/+9 flat: 8% and 25%, copying the key): the other slots, and
# NQ and the domain set, where the local layers once cost the last slot (NQ ~2K, fixed +2)
PRESETS["gemmaall"] = PRESETS["kvgemma"][-1:]
# Gemma-3-270M on the domain set at ~6.5K: with the flat ramp (+4 far, +2 near) it recites the
# biased bulletin at the first slot; flat +2 and +3 instead
PRESETS["gemmalong"] = [Condition(f"engram top1 s{x}", strength=float(x), top_k=1) for x in (2, 3)]
# slow sets (~8K): the core table and the two share targets best on NQ ~4K, in one prefill per prompt
PRESETS["coremass"] = PRESETS["core"] + [c for c in PRESETS["mass"] + PRESETS["massavg"]
                                         if c.name in ("engram top1 mass20", "engram top1 massavg20")]
# sliding-window models (Gemma 3): global layers are the default; compare with local and both
PRESETS["swa"] = PRESETS["main"] + [
    Condition("engram s4", strength=4.0), Condition("engram s1", strength=1.0),
    Condition("engram local", layers="local"), Condition("engram global+local", layers="all"),
    Condition("engram global+local s4", layers="all", strength=4.0), Condition("oracle s4", "oracle", strength=4.0)]


def wilson(k, n, z=1.96):
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def mcnemar(b, c):
    """Exact two-sided McNemar p-value from the discordant counts."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def fmt_p(p):
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def load_rows(path, data=None):
    """Result rows, judged again with the current judge (so a fix to refusal detection applies)."""
    from engram_llama.evaluate import judge, load_nq

    rows = [json.loads(l) for l in Path(path).read_text().splitlines()]
    answers = {}
    if any("answers" not in r for r in rows if r.get("answer") is not None):  # files written before rows kept them
        answers = {it["id"]: it["answers"] for it in load_nq(data or ROOT.parent / "shared" / "data" / "nq-open-dev.jsonl.gz")}
    for r in rows:
        a = r.get("answers") or answers.get(r["id"])
        if a is not None and "answer" in r:
            r["judge"] = judge(r["answer"], a)
    return rows


def session_report(path):
    rows = [r for r in load_rows(path) if r["id"] != "session"]
    doc = [r["prefill_s"] for r in load_rows(path) if r["id"] == "session"]
    n_q = len({r["id"] for r in rows})
    toks = max(r["n_tokens"] for r in rows)
    print(f"{path}: {n_q} questions on one context of {rows[0]['n_passages']} passages (~{toks} tokens); "
          f"document prefill {', '.join(f'{x:.1f}' for x in doc)} s\n")
    print("| condition | correct | 95% CI | wrong | refusal | seconds per answer | vs reorder (+/-) | McNemar p |")
    print("|---|---|---|---|---|---|---|---|")
    by = {}
    for r in rows:
        by.setdefault(r["condition"], {})[r["id"]] = r
    for c, d in by.items():
        n = len(d)
        k = sum(r["judge"] == "correct" for r in d.values())
        lo, hi = wilson(k, n)
        # reorder+engram rides on reorder's prefill in this run; alone it would pay for it
        pre = {i: by["reorder"][i]["prep_s"] + by["reorder"][i]["prefill_s"] for i in d} if c.startswith("reorder+") else {}
        secs = sum(r.get("prep_s", 0) + r["prefill_s"] + r["answer_s"] + pre.get(i, 0.0) for i, r in d.items())
        if not c.startswith("reorder"):  # the shared document prefill (the first run's), spread over the session
            secs += sum(doc[:1])
        base = by.get("reorder", {})
        both = [i for i in d if i in base]
        b = sum(d[i]["judge"] == "correct" and base[i]["judge"] != "correct" for i in both)
        cc = sum(d[i]["judge"] != "correct" and base[i]["judge"] == "correct" for i in both)
        vs, p = ("", "") if c == "reorder" else (f"+{b}/-{cc}", fmt_p(mcnemar(b, cc)))
        print(f"| {c} | {k}/{n} ({100 * k / n:.0f}%) | {100 * lo:.0f}-{100 * hi:.0f}% | "
              f"{sum(r['judge'] == 'wrong' for r in d.values())} | {sum(r['judge'] == 'refusal' for r in d.values())} | "
              f"{secs / n:.1f} | {vs} | {p} |")


def compose(rows, name, first, rest):
    """Rows of a rule that reads the moved chunk again only when it is the documents' first
    (reread "first"), from the rows of reading it again (`first`) and of shifting it (`rest`, a
    list: the first with a row for the prompt), where the rule's own rows are missing: exact where
    the gold ranked first (then the moved chunk is the gold, first exactly at the first slot) and at
    the first slot (the gold is chunk 0; any other moved chunk is not); a prompt neither covers
    (gold not top-1 at the middle or last slot) is named, to be run with `--preset rereadfirst`."""
    by = {(r["id"], r["slot"], r["condition"]): r for r in rows}
    out, undecided = [], []
    for i, slot in dict.fromkeys((r["id"], r["slot"]) for r in rows if r["condition"] in [first, *rest]):
        own = by.get((i, slot, name))
        if own:
            out.append(own)
            continue
        shift = next((by[i, slot, c] for c in rest if (i, slot, c) in by), None)
        if shift is None:
            continue
        if shift["gold_rank"] != 0 and slot != "first":
            undecided.append(f"{i}@{slot}")
            continue
        src = by.get((i, slot, first)) if slot == "first" and shift["gold_rank"] == 0 else shift
        if src is not None:
            out.append({**src, "condition": name, "composed_from": src["condition"]})
    _left_out("compose", name, undecided)
    return out


def _left_out(what, name, prompts):
    """compose and fill_near decide a prompt only where the gold ranked first: the rest, named."""
    if prompts:
        print(f"{what}: {name}: {len(prompts)} prompts left out, the gold not ranked first there: "
              f"{', '.join(prompts)}\n")


def fill_near(rows, name, base):
    """Rows of a condition that differs from `base` only in its strength next to the question
    (`near`: the chunks in the prompt's last quarter, bias.chunk_strength), run at the last slot
    alone: at the first and middle slots `base`'s row stands in where the gold ranked first (the
    one chunk biased then lies before that quarter, so the bias is the same vector); its own rows
    where it has them. A prompt it lacks with the gold not ranked first is named, to be run."""
    have = {(r["id"], r["slot"]) for r in rows if r["condition"] == name}
    out, missing = [], []
    for r in rows:
        if r["condition"] != base or (r["id"], r["slot"]) in have or r["slot"] == "last":
            continue
        if r["gold_rank"] != 0:
            missing.append(f"{r['id']}@{r['slot']}")
            continue
        out.append({**r, "condition": name, "composed_from": base})
    _left_out("fill", name, missing)
    return out


def report(path, against="vanilla", comp=None, near=None):
    rows = [r for r in load_rows(path) if r["slot"] != "gold-only"]
    if comp:
        name, first, *rest = comp
        rows = [r for r in rows if r["condition"] != name] + compose(rows, name, first, rest)
    if near:
        rows = rows + fill_near(rows, *near)
    res = {}
    for r in rows:
        res.setdefault((r["condition"], r["slot"]), {})[r["id"]] = r["judge"]
        # every slot pooled, paired by (item, slot): the overall comparison with more power
        res.setdefault((r["condition"], "all"), {})[(r["id"], r["slot"])] = r["judge"]
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    slots = [s for s in ("first", "middle", "last", "all") if any(k[1] == s for k in res)]
    if not rows:
        sys.exit(f"eval report: {path} has no answers in context yet (only the closed-book gold-only checks)")
    n_tok = sorted(r["n_tokens"] for r in rows)
    print(f"{path}: {len({r['id'] for r in rows})} items, prompts {n_tok[0]}-{n_tok[-1]} tokens\n")
    print("(all: the slots pooled, paired by item and slot; reordering's prompt is the same at every slot, so two\n"
          " reordering conditions are compared on one slot)\n")
    print(f"| condition | slot | n | correct | 95% CI | wrong | refusal | vs {against} (+/-) | McNemar p |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in conds:
        for s in slots:
            d = res.get((c, s), {})
            n = len(d)
            k = sum(v == "correct" for v in d.values())
            lo, hi = wilson(k, n)
            wr = sum(v == "wrong" for v in d.values())
            rf = sum(v == "refusal" for v in d.values())
            base = res.get((against, s), {})
            both = [i for i in d if i in base]
            b = sum(d[i] == "correct" and base[i] != "correct" for i in both)
            cc = sum(d[i] != "correct" and base[i] == "correct" for i in both)
            same_prompt = s == "all" and one_prompt(c, against)
            vs = f"+{b}/-{cc}" if c != against and base and not same_prompt else ""
            p = fmt_p(mcnemar(b, cc)) if c != against and base and not same_prompt else ""
            print(f"| {c} | {s} | {n} | {100 * k / max(n, 1):.0f}% | {100 * lo:.0f}-{100 * hi:.0f}% | {wr} | {rf} | {vs} | {p} |")
    probed = [c for c in conds if any("m0" in r for r in rows if r["condition"] == c)]
    if not probed:
        return

    def med(rs, field, pct):
        v = np.array([r[field] for r in rs if field in r], float) * (100 if pct else 1)
        u = "%" if pct else ""
        return f"{np.median(v):.2f}{u} ({v.min():.2f}-{v.max():.2f}{u})" if len(v) else ""

    # what the attention probe read (the top chunk's unbiased share, and the most-read other
    # chunk's for rival targets) and the strength it set
    print("\n| condition | slot | share read (m0) | most-read other chunk | strength |\n|---|---|---|---|---|")
    for c in probed:
        for s in slots[:-1]:
            rs = [r for r in rows if r["condition"] == c and r["slot"] == s and "m0" in r]
            if rs:
                print(f"| {c} | {s} | {med(rs, 'm0', True)} | {med(rs, 'm_rival', True)} | {med(rs, 'strength', False)} |")
    print("(median (range) over the prompts)")


def questions(rows):
    """Each row's question: the row's own (files from 2026-11-27 on), else rebuilt from the data
    by id (NQ, KV with its key, the generated domain set at the row's passage count)."""
    from engram_llama import datasets
    from engram_llama.evaluate import load_nq

    out = {r["id"]: r["question"] for r in rows if "question" in r}
    need = {r["id"]: r.get("n_passages", 2) for r in rows if r["id"] not in out}
    data = ROOT.parent / "shared" / "data"
    if any(i.startswith("kv") for i in need):
        out.update((it.id, it.question) for it in datasets.kv(data / "kv-retrieval-75-dev.jsonl.gz", 2))
    if any(not i.startswith(("kv", "dom-")) for i in need):
        out.update((it["id"], it["question"]) for it in load_nq(data / "nq-open-dev.jsonl.gz"))
    for n in sorted({n for i, n in need.items() if i.startswith("dom-")}):
        out.update((it.id, it.question) for it in datasets.domain(400, n, 0))
    return out


def misses(path):
    """The wrong answers by kind (evaluate.miss_kind), per condition and slot."""
    from engram_llama.evaluate import miss_kind

    rows = [r for r in load_rows(path) if r["slot"] != "gold-only"]
    qs = questions(rows)
    tally = {}
    for r in rows:
        t = tally.setdefault((r["condition"], r["slot"]), {"n": 0, "correct": 0, "refusal": 0, "echo": 0, "near": 0,
                                                           "other": 0})
        t["n"] += 1
        kind = r["judge"] if r["judge"] != "wrong" else miss_kind(r["answer"], r["answers"], qs[r["id"]])
        t[kind] += 1
    print(f"{path}: answers by kind (echo: repeats >= 16 characters of the question, a KV key copied; near: "
          f"a garbled copy of the gold answer)\n")
    print("| condition | slot | n | correct | refusal | echo | near | other |\n|---|---|---|---|---|---|---|---|")
    slots = ("first", "middle", "last")
    for c in dict.fromkeys(r["condition"] for r in rows):
        for s in slots:
            if (c, s) in tally:
                t = tally[(c, s)]
                print(f"| {c} | {s} | {t['n']} | {t['correct']} | {t['refusal']} | {t['echo']} | {t['near']} | {t['other']} |")


def one_prompt(a, b):
    """Two reordering conditions see one prompt at every slot: pooling the slots would count it 3 times."""
    return a.startswith("reorder") and b.startswith("reorder")


def pooled(paths, condition, against, slot="first", exclude=()):
    """One condition against another over several files (models, lengths), paired by file and item
    at one slot ("all": every slot, paired by item and slot): the test across runs that each alone
    are too small. `exclude`: result files whose items are left out (where a setting was chosen, so
    the rest is its held-out test)."""
    if slot == "all" and one_prompt(condition, against):
        sys.exit("eval pooled: two reordering conditions see one prompt at every slot; give --slot first")
    skip = {r["id"] for f in exclude for r in load_rows(f)}
    print(f"{condition} against {against}, slot {slot}" + (f", leaving out the {len(skip)} items of "
                                                           f"{', '.join(exclude)}" if skip else "") + "\n")
    print(f"| file | n | {against} | {condition} | +/- | McNemar p |")
    print("|---|---|---|---|---|---|")
    def tally(ids, a, c):  # n, base correct, cond correct, gained, lost
        return [len(ids), sum(a[i] for i in ids), sum(c[i] for i in ids),
                sum(c[i] and not a[i] for i in ids), sum(a[i] and not c[i] for i in ids)]

    def line(name, t):
        n = max(t[0], 1)
        p = mcnemar(t[3], t[4])
        ptxt = fmt_p(p)
        print(f"| {name} | {t[0]} | {100 * t[1] / n:.0f}% | {100 * t[2] / n:.0f}% | +{t[3]}/-{t[4]} | {ptxt} |")

    tot, first, lower = [0] * 5, [0] * 5, [0] * 5
    for path in paths:
        res, top = {}, {}
        for r in load_rows(path):
            if slot in (r["slot"], "all") and r["slot"] != "gold-only" and r["condition"] in (condition, against) \
                    and r["id"] not in skip:
                key = (r["id"], r["slot"])
                res.setdefault(r["condition"], {})[key] = r["judge"] == "correct"
                if r["condition"] == against:
                    top[key] = r.get("gold_rank") == 0
        a, c = res.get(against, {}), res.get(condition, {})
        ids = [i for i in c if i in a]
        row = tally(ids, a, c)
        tot = [x + y for x, y in zip(tot, row)]
        first = [x + y for x, y in zip(first, tally([i for i in ids if top[i]], a, c))]
        lower = [x + y for x, y in zip(lower, tally([i for i in ids if not top[i]], a, c))]
        line(Path(path).name, row)
    line("**all**", tot)
    # where the difference comes from: prompts whose gold the pipeline ranked first, or lower
    line("all, gold ranked first", first)
    line("all, gold ranked lower", lower)


def agree(paths, a, b):
    """Do two conditions give the same judgement on the same prompt, split by whether the pipeline
    ranked the gold first? (The pipeline's top-1 and the oracle bias the same chunk exactly when
    it did, so any gap between them has to come from the other prompts.)"""
    print(f"{a} against {b}, same prompt (item and slot), same strength\n")
    print("| file | gold ranked | prompts | same judgement | both correct | only " + a + " | only " + b + " |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        rows = {(r["id"], r["slot"], r["condition"]): r for r in load_rows(path)}
        for first in (True, False):
            t = [0] * 5
            for (i, s, c), ra in rows.items():
                rb = rows.get((i, s, b))
                if c != a or rb is None or ra.get("strength") != rb.get("strength") or \
                        (ra.get("gold_rank") == 0) != first:
                    continue
                ca, cb = ra["judge"] == "correct", rb["judge"] == "correct"
                t = [t[0] + 1, t[1] + (ra["judge"] == rb["judge"]), t[2] + (ca and cb), t[3] + (ca and not cb),
                     t[4] + (cb and not ca)]
            if t[0]:
                print(f"| {Path(path).name} | {'first' if first else 'lower'} | " + " | ".join(map(str, t)) + " |")


def plot(path, out_png, conds=("vanilla", "engram", "oracle", "reorder")):
    """Accuracy against gold position, one line per condition, Wilson 95% bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(path)
    conds = [c for c in conds if any(r["condition"] == c for r in rows)]
    slots = ["first", "middle", "last"]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for k, c in enumerate(conds):
        ys, lo, hi = [], [], []
        for s in slots:
            d = [r["judge"] == "correct" for r in rows if r["condition"] == c and r["slot"] == s]
            p = sum(d) / max(len(d), 1)
            a, b = wilson(sum(d), len(d))
            ys.append(100 * p); lo.append(100 * (p - a)); hi.append(100 * (b - p))
        xs = [i + (k - 1.5) * 0.05 for i in range(3)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=c)
    n = len({r["id"] for r in rows if r["slot"] != "gold-only"})
    ax.set_xticks(range(3), ["first", "middle", "last"])
    ax.set_xlabel("position of the gold passage")
    ax.set_ylabel("correct (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{Path(path).stem}, n={n}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    print(f"wrote {out_png}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct)")
    r.add_argument("--out", required=True)
    r.add_argument("--n", type=int, default=40)
    r.add_argument("--passages", type=int, default=15)
    r.add_argument("--preset", choices=list(PRESETS), default="main")
    r.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "nq-open-dev.jsonl.gz"))
    r.add_argument("-c", "--ctx-size", type=int, default=4096)
    r.add_argument("--no-chat", action="store_true", help="plain prompt with an answer prefix (base models)")
    r.add_argument("--dataset", choices=["nq", "kv", "domain"], default="nq")
    r.add_argument("--slots", default="first,middle,last", help="gold slots to run, comma-separated")
    r.add_argument("--ids", default=None, help="only these item ids, comma-separated (where a condition can differ)")
    r.add_argument("--rerank", type=int, default=None, metavar="K",
                   help="chunks reread for the question's likelihood (default: the runtime's; 0: ranking r3)")
    r.add_argument("--restate-key", action="store_true",
                   help="KV: the answer starts 'Answer: \"KEY\": \"', so the value is its continuation "
                        "(a file's rows do not record it: give it to every run on that file)")
    se = sub.add_parser("session", help="several questions on one fixed context: cached documents vs reordering")
    se.add_argument("--model", default=None)
    se.add_argument("--out", required=True)
    se.add_argument("--n", type=int, default=8)
    se.add_argument("-c", "--ctx-size", type=int, default=8192)
    se.add_argument("--no-chat", action="store_true")
    se.add_argument("--rerank", type=int, default=None, metavar="K")
    sr = sub.add_parser("session-report")
    sr.add_argument("path")
    p = sub.add_parser("report")
    p.add_argument("path")
    p.add_argument("--against", default="vanilla", help="the condition the paired test compares with")
    p.add_argument("--misses", action="store_true", help="instead: the wrong answers by kind (echo, near, other)")
    p.add_argument("--fill-near", nargs=2, metavar=("COND", "BASE"),
                   help="COND differs from BASE only next to the question: BASE's first- and middle-slot rows "
                        "stand in for it where the gold ranked first (eval.fill_near)")
    p.add_argument("--compose", nargs="+", metavar="COND",
                   help="NAME REREAD SHIFT [SHIFT...]: adds the rule reread 'first' as NAME, from the rows of "
                        "reading the moved chunk again and of shifting it (eval.compose)")
    po = sub.add_parser("pooled", help="one condition against another over several result files, paired")
    po.add_argument("paths", nargs="+")
    po.add_argument("--condition", required=True)
    po.add_argument("--against", required=True)
    po.add_argument("--slot", default="first", choices=["first", "middle", "last", "all"])
    po.add_argument("--exclude", nargs="*", default=[], help="result files whose items are left out")
    ag = sub.add_parser("agree", help="two conditions' judgements on the same prompts, by gold rank")
    ag.add_argument("paths", nargs="+")
    ag.add_argument("--a", required=True)
    ag.add_argument("--b", required=True)
    g = sub.add_parser("plot")
    g.add_argument("path")
    g.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    if args.cmd == "report":
        if args.compose and len(args.compose) < 3:
            sys.exit("eval report: --compose takes NAME REREAD SHIFT [SHIFT...]")
        misses(args.path) if args.misses else report(args.path, args.against, args.compose, args.fill_near)
        return 0
    if args.cmd == "pooled":
        pooled(args.paths, args.condition, args.against, args.slot, args.exclude)
        return 0
    if args.cmd == "agree":
        agree(args.paths, args.a, args.b)
        return 0
    if args.cmd == "session-report":
        session_report(args.path)
        return 0
    if args.cmd == "plot":
        plot(args.path, args.out)
        return 0
    from engram_llama.cli import default_model
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.cmd == "session":
        from engram_llama.evaluate import session
        session(args.model or default_model(), args.out, n_questions=args.n, n_ctx=args.ctx_size,
                chat=not args.no_chat, log=log, rerank=args.rerank)
        return 0
    if args.restate_key and args.dataset != "kv":
        ap.error("--restate-key is for --dataset kv")
    slots = tuple(args.slots.split(","))
    if not slots or any(x not in ("first", "middle", "last") for x in slots):
        ap.error(f"--slots {args.slots!r}: comma-separated first, middle, last")
    data = args.data
    if args.dataset == "kv" and data.endswith("nq-open-dev.jsonl.gz"):
        data = str(ROOT.parent / "shared" / "data" / "kv-retrieval-75-dev.jsonl.gz")
    try:
        run(args.model or default_model(), args.out, n_items=args.n, n_passages=args.passages,
            conditions=PRESETS[args.preset], data=data, n_ctx=args.ctx_size, chat=not args.no_chat,
            log=log, dataset=args.dataset, slots=slots, rerank=args.rerank, restate_key=args.restate_key,
            only=set(args.ids.split(",")) if args.ids else None)
    except ValueError as e:  # a file made with another prompt, a condition that cannot run
        sys.exit(f"eval run: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
