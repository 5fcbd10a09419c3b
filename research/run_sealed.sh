#!/usr/bin/env bash
# The sealed split (docs/EVAL.md section 2), every cell for one model, in order; run it once.
# Resumable: each cell's file keeps its rows and the same command goes on where it stopped.
#   [PRESET=sealed] [CELLS="nq bulletin kv nq8k"] research/run_sealed.sh NAME MODEL.gguf PROFILE.json [--no-chat]
# Gemma-3-270M, as run: its NQ and bulletin cells with the preset "sealed", then the rest with the
# rule-2 condition declared before them (EVAL.md section 2):
#   research/run_sealed.sh gemma3-270m-fix GEMMA.gguf research/profiles/gemma-3-270m-q4_k_m.rule1.json --no-chat
#   PRESET=sealed-rule2 CELLS="kv nq8k" research/run_sealed.sh gemma3-270m-fix GEMMA.gguf research/profiles/gemma-3-270m-q4_k_m.rule1.json --no-chat
#   (then, to decide whether a profile ships, chunk+4 added to the first two cells' files:)
#   PRESET=sealed-rule2 CELLS="nq bulletin" research/run_sealed.sh gemma3-270m-fix GEMMA.gguf research/profiles/gemma-3-270m-q4_k_m.rule1.json --no-chat
# SmolLM2-135M-Instruct, as run: every cell at 16-token answers (96 on KV), then the rerun declared
# after them (EVAL.md section 2):
#   research/run_sealed.sh smollm2 SMOLLM2.gguf research/profiles/smollm2-135m-instruct-q4_1.json
#   CELLS="bulletin nq nq8k" research/run_sealed.sh smollm2-48t SMOLLM2.gguf research/profiles/smollm2-135m-instruct-q4_1.json --max-new 48
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: [PRESET=..] [CELLS=..] $0 NAME MODEL.gguf PROFILE.json [--no-chat]" >&2; exit 2; }
name=$1 model=$2 prof=$3; shift 3
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
S=("$py" -m research run --sealed --preset "${PRESET:-sealed}" --no-filter --model "$model" --profile "$prof" "$@")
out=docs/results
for cell in ${CELLS:-nq bulletin kv nq8k}; do
  case $cell in
    nq)       "${S[@]}" --n 100 --passages 30 -c 4096 --out "$out/sealed-nq-$name-30p.jsonl" ;;
    bulletin) "${S[@]}" --dataset bulletin --n 100 --passages 36 -c 4096 --out "$out/sealed-bulletin-$name-36p.jsonl" ;;
    kv)       "${S[@]}" --dataset kv --n 100 --passages 42 -c 4096 --out "$out/sealed-kv-$name-42r.jsonl" ;;
    nq8k)     "${S[@]}" --n 40 --passages 58 -c 8192 --out "$out/sealed-nq-$name-58p.jsonl" ;;
    *) echo "unknown cell $cell (nq bulletin kv nq8k)" >&2; exit 2 ;;
  esac
done
