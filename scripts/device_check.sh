#!/usr/bin/env bash
# The GPU side of docs/PERFORMANCE.md, on a lent NVIDIA machine (no package registry, 16 cores):
# build the patched libllama and the unpatched one of the same commit for CUDA, run the hook's
# numeric and API tests with the generated models on the GPU, make the Qwen3.5-2B-shaped model
# (random weights, Q8_0) and time an 8K prefill unpatched / cleared / active, FA off and on, then a
# follow-up on cached 8K documents against a re-prefill (scripts/bench_checkpoint.py).
#     bash scripts/device_prepare.sh           # here, first: fills .device/ (ignored by git)
#     bash scripts/device_check.sh             # there; `cpu` as first argument: a CPU rehearsal
# Steps already done on the same machine (build, model) are skipped, so a rerun continues.
# TESTS: the test files to run on the GPU (default: the hook's); BENCH=0: no model, no bench.
# Results (logs, the bench table) go to $OUT (default .device/out).
set -uo pipefail
export PATH=$PATH:/usr/local/cuda/bin PYTHONFAULTHANDLER=1
cd "$(dirname "$0")/.."
D=$PWD/.device
MODE=${1:-cuda}
PY=${PYTHON:-python3}
OUT=${OUT:-$D/out}
mkdir -p "$OUT"
B=$D/build-$MODE
step() { echo "[$(date +%T)] $*" | tee -a "$OUT/steps.log"; }

[ -d "$D/llama" ] || { echo "device_check: no .device/llama here; run scripts/device_prepare.sh first" >&2; exit 1; }
L=$D/logs; mkdir -p "$L"   # long logs; $OUT keeps the few files worth bringing back
step "python packages"
$PY -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$D/site" "$D"/whl/*.whl \
    > "$L/pip.log" 2>&1 || { tail -3 "$L/pip.log"; exit 1; }
export PYTHONPATH=$D/site:$D/py:$PWD/python:$PWD
export ENGRAM_LLAMA_CACHE=$D/cache

if [ ! -e "$B/bin-unpatched/libllama.so" ]; then
    step "build ($MODE)"
    flags=()
    # GGML_CUDA_NO_VMM: plain cudaMalloc for ggml's pool, no virtual-memory-management calls
    # (sandboxed GPU machines); both libllamas share these ggml libraries, so the comparison holds
    [ "$MODE" = cuda ] && flags=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DGGML_CUDA_NO_VMM=ON)
    cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$(command -v $PY)" \
        -DENGRAM_LLAMA_SOURCE="$D/llama" -DENGRAM_UNPATCHED_SOURCE="$D/llama-unpatched" "${flags[@]}" \
        > "$L/configure.log" 2>&1 || { tail -20 "$L/configure.log"; exit 1; }
    cmake --build "$B" -j "$(nproc)" > "$L/build.log" 2>&1 || { grep -m5 -A5 "error" "$L/build.log"; exit 1; }
    # the unpatched libllama beside the same ggml libraries
    for f in "$B"/bin/libggml*.so*; do ln -sf "$f" "$B/bin-unpatched/"; done
fi
export ENGRAM_LLAMA_LIB_DIR=$B/bin
ngl=0; [ "$MODE" = cuda ] && ngl=99

model=${BENCH_MODEL:-qwen35-2b}
BENCH=${BENCH:-1}
TESTS=${TESTS:-tests/test_hook_numeric.py tests/test_hook_api.py}
mk=""
[ "$BENCH" = 0 ] || { step "model $model (Q8_0, background)"
$PY -c "from research import synth; print(synth.cached_model('$model', quant='q8_0'))" \
    > "$L/model.log" 2>&1 &
mk=$!; }

# one decode on the GPU first, under the environments that may be needed, keeping the first that works
{
    [ "$MODE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    ldd "$B/bin/libggml-cuda.so" 2>/dev/null | grep -iE "cublas|cudart|libcuda|stdc"
    for l in "$B"/bin/libllama.so "$B"/bin-unpatched/libllama.so; do echo "$l needs:"; readelf -d "$l" | grep NEEDED; done
    # an H200 session: model loading crashed in llama_model::print_info, inside an ostream insert
    # that the backtrace placed in libggml-cuda.so; CMakeLists.txt now keeps that library's
    # runtime copies private (cmake/ggml-backend-exports.map): both counts should be 0
    echo "std:: symbols exported by libggml-cuda: $(nm -D --defined-only "$B/bin/libggml-cuda.so" | c++filt | grep -c ' std::')"
    echo "non-ggml_ symbols exported by libggml-cuda: $(nm -D --defined-only "$B/bin/libggml-cuda.so" | grep -vc ' ggml_')"
    echo "LDFLAGS=${LDFLAGS:-} CXXFLAGS=${CXXFLAGS:-} CFLAGS=${CFLAGS:-} CUDAFLAGS=${CUDAFLAGS:-}"
    for l in "$B"/bin/lib*.so "$B"/bin-unpatched/libllama.so; do
        echo "$l: $(nm -D --defined-only "$l" | c++filt | grep -c ' std::') std:: symbols defined"
    done
    grep -E "CMAKE_(CXX|SHARED_LINKER)_FLAGS:|CMAKE_CXX_COMPILER:" "$B/CMakeCache.txt"
    nm -D --defined-only "$B/bin/libggml-cuda.so" | c++filt | grep ' std::' | grep -E "_M_insert|num_put" | head -5
} > "$OUT/smoke.log" 2>&1
ok=""
stdcxx=$(g++ -print-file-name=libstdc++.so.6 2>/dev/null)
for env in "" "LD_PRELOAD=$stdcxx" "LD_PRELOAD=$stdcxx GGML_CUDA_DISABLE_GRAPHS=1"; do
    step "smoke: env [$env]"
    echo "== env [$env]" >> "$OUT/smoke.log"
    if env $env ENGRAM_TEST_N_GPU_LAYERS=$ngl timeout 90 $PY -X faulthandler -m pytest -x -q -p no:cacheprovider \
        "tests/test_hook_numeric.py::test_zero_and_cleared_bias_are_bit_identical" >> "$OUT/smoke.log" 2>&1; then
        ok=1; break
    fi
done
[ -n "$ok" ] || { step "no environment ran a decode on the GPU; see smoke.log"; tail -40 "$OUT/smoke.log"; exit 1; }
[ -n "$env" ] && export $env
step "using env [$env]"

step "tests, models on the GPU (background): $TESTS"
ENGRAM_TEST_N_GPU_LAYERS=$ngl $PY -X faulthandler -m pytest -q -p no:cacheprovider $TESTS > "$OUT/tests.log" 2>&1 &
tests=$!
if [ -n "$mk" ]; then
    wait $mk || { tail -5 "$L/model.log"; exit 1; }
    step "model: $(tail -1 "$L/model.log")"
fi
wait $tests; trc=$?
step "tests exit $trc: $(tail -1 "$OUT/tests.log")"
[ "$BENCH" = 0 ] && { step "done (tests $trc, no bench)"; exit $trc; }

step "bench"
$PY -X faulthandler scripts/bench_hook.py --model "synth:$model:q8_0" --ctx "${BENCH_CTX:-8192}" --gen 16 \
    --reps "${BENCH_REPS:-3}" --inner 3 --n-gpu-layers $ngl --unpatched-lib "$B/bin-unpatched" \
    > "$OUT/bench.md" 2> "$OUT/bench.log"
brc=$?
cat "$OUT/bench.md"; tail -3 "$OUT/bench.log"
# follow-ups over cached 8K documents against a re-prefill (document checkpoints), the same model
step "bench: checkpoints"
$PY -X faulthandler scripts/bench_checkpoint.py --model "$(tail -1 "$L/model.log")" -ngl $ngl \
    > "$OUT/bench_checkpoint.md" 2> "$OUT/bench_checkpoint.log"
crc=$?
cat "$OUT/bench_checkpoint.md"; tail -3 "$OUT/bench_checkpoint.log"
step "done (tests $trc, bench $brc, checkpoints $crc)"
exit $(( trc || brc || crc ))
