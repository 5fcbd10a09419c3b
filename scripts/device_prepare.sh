#!/usr/bin/env bash
# Gather, here, what scripts/device_check.sh needs on a GPU machine that has no package registry
# and gets only the working tree: trimmed patched and unpatched llama.cpp trees (the sdist's, as
# pinned and checked by scripts/llama_source.py), llama-cpp-python's Python part, and wheels of
# the Python packages that machine lacks (for its Python 3.12). Everything lands in .device/,
# which git ignores.
#     bash scripts/device_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
[ -x "$VPY" ] || { echo "device_prepare: run scripts/setup.sh first" >&2; exit 1; }
D=.device
rm -rf $D/llama $D/llama-unpatched $D/py $D/whl
mkdir -p $D/llama $D/llama-unpatched $D/py $D/whl
patched=$("$VPY" scripts/llama_source.py)
unpatched=$("$VPY" scripts/llama_source.py --unpatched)
# what a libllama + ggml build reads; the other backends' sources are left behind (size limit)
for part in CMakeLists.txt cmake include src common vendor ggml; do
    cp -a "$patched/$part" $D/llama/
done
for b in $D/llama/ggml/src/ggml-*/; do
    case $(basename "$b") in ggml-cpu|ggml-cuda|ggml-blas) ;; *) rm -rf "$b" ;; esac
done
cp -a "$unpatched/src" "$unpatched/include" $D/llama-unpatched/
# llama-cpp-python's Python part (its libllama is the one built there)
sdist=$("$VPY" scripts/llama_source.py --sdist)
tar -xzf "$sdist" -C $D/py --strip-components=1 --wildcards '*/llama_cpp/*'
rm -rf $D/py/llama_cpp/lib
# cffi has a compiled part: the wheel for that machine's Python (3.12); the rest are pure Python
"$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d $D/whl "cffi==$("$VPY" -c 'import cffi; print(cffi.__version__)')"
"$VPY" -m pip download -q --no-deps --only-binary=:all: -d $D/whl \
    "pycparser==$("$VPY" -c 'import pycparser; print(pycparser.__version__)')" \
    "gguf==$("$VPY" -c 'import importlib.metadata as m; print(m.version("gguf"))')" \
    "diskcache==$("$VPY" -c 'import diskcache; print(diskcache.__version__)')" \
    "tqdm==$("$VPY" -c 'import tqdm; print(tqdm.__version__)')"
du -sh $D/llama $D/llama-unpatched $D/py $D/whl
