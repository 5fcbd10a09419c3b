#!/usr/bin/env bash
# The third held-out split (docs/EVAL.md section 2, "A third held-out split (the late layers)"), for
# SmolLM2-135M-Instruct's profile recalibrated with the late layers among the candidates; run it
# once. Resumable.
#   [CELLS="nq bulletin kv nq8k"] research/run_heldout_late.sh SMOLLM2.gguf PROFILE.json
# nq, bulletin, nq8k: the fresh items of research/heldout-late.json; kv: the sealed KV items (no
# fresh ones exist), not held out.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: [CELLS=..] $0 SMOLLM2.gguf PROFILE.json" >&2; exit 2; }
model=$1 prof=$2
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
S=("$py" -m research run --preset late --no-filter --model "$model" --profile "$prof")
H=research/heldout-late.json out=docs/results
for cell in ${CELLS:-nq bulletin kv nq8k}; do
  case $cell in
    nq)       "${S[@]}" --split "$H" --n 100 --passages 30 -c 4096 --max-new 48 --out "$out/late-nq-smollm2-30p.jsonl" ;;
    bulletin) "${S[@]}" --split "$H" --dataset bulletin --n 100 --passages 36 -c 4096 --max-new 48 --out "$out/late-bulletin-smollm2-36p.jsonl" ;;
    kv)       "${S[@]}" --sealed --dataset kv --n 100 --passages 42 -c 4096 --out "$out/late-kv-smollm2-42r.jsonl" ;;
    nq8k)     "${S[@]}" --split "$H:nq8k" --n 40 --passages 58 -c 8192 --max-new 48 --out "$out/late-nq-smollm2-58p.jsonl" ;;
    *) echo "unknown cell $cell (nq bulletin kv nq8k)" >&2; exit 2 ;;
  esac
done
