#!/usr/bin/env bash
# The sealed split (docs/EVAL.md section 2), every cell for one model, in order; run it once.
# Resumable: each cell's file keeps its rows and the same command goes on where it stopped.
#   research/run_sealed.sh NAME MODEL.gguf PROFILE.json [--no-chat]
# e.g. research/run_sealed.sh gemma3-270m ~/.cache/.../gemma-3-270m-q4_k_m.gguf research/profiles/gemma-3-270m-q4_k_m.json --no-chat
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 NAME MODEL.gguf PROFILE.json [--no-chat]" >&2; exit 2; }
name=$1 model=$2 prof=$3; shift 3
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
S=("$py" -m research run --sealed --preset sealed --no-filter --model "$model" --profile "$prof" "$@")
out=docs/results
"${S[@]}" --n 100 --passages 30 -c 4096 --out "$out/sealed-nq-$name-30p.jsonl"
"${S[@]}" --dataset bulletin --n 100 --passages 36 -c 4096 --out "$out/sealed-bulletin-$name-36p.jsonl"
"${S[@]}" --dataset kv --n 100 --passages 42 -c 4096 --out "$out/sealed-kv-$name-42r.jsonl"
"${S[@]}" --n 40 --passages 58 -c 8192 --out "$out/sealed-nq-$name-58p.jsonl"
