#!/usr/bin/env bash
# Set up (idempotent, cached), then answer a question over the shipped sample documents
# (Indian government schemes, districts, rupee amounts, some Hindi) with SmolLM2-135M-Instruct,
# showing the citations and what the bias steered. Extra arguments go to `engram-llama run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/engram-llama run --default --explain "$@"
