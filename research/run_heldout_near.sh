#!/usr/bin/env bash
# The second held-out split (docs/EVAL.md section 2, "A second held-out split (the near-question
# share)"), for Gemma-3-270M's profile recalibrated with the family's share next to the question;
# run it once. Resumable.
#   [CELLS="bulletin nq kv nq8k"] [SLOTS=last] research/run_heldout_near.sh GEMMA.gguf PROFILE.json
# bulletin, nq, nq8k: the fresh items of research/heldout-near.json; kv: the sealed KV items (no
# fresh ones exist), not held out.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: [CELLS=..] [SLOTS=..] $0 GEMMA.gguf PROFILE.json" >&2; exit 2; }
model=$1 prof=$2
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
S=("$py" -m research run --preset near --no-filter --no-chat --model "$model" --profile "$prof" --slots "${SLOTS:-last}")
H=research/heldout-near.json out=docs/results
for cell in ${CELLS:-bulletin nq kv nq8k}; do
  case $cell in
    bulletin) "${S[@]}" --split "$H" --dataset bulletin --n 100 --passages 36 -c 4096 --out "$out/near-bulletin-gemma3-270m-36p.jsonl" ;;
    nq)       "${S[@]}" --split "$H" --n 100 --passages 30 -c 4096 --out "$out/near-nq-gemma3-270m-30p.jsonl" ;;
    kv)       "${S[@]}" --sealed --dataset kv --n 100 --passages 42 -c 4096 --out "$out/near-kv-gemma3-270m-42r.jsonl" ;;
    nq8k)     "${S[@]}" --split "$H:nq8k" --n 40 --passages 58 -c 8192 --out "$out/near-nq-gemma3-270m-58p.jsonl" ;;
    *) echo "unknown cell $cell (bulletin nq kv nq8k)" >&2; exit 2 ;;
  esac
done
