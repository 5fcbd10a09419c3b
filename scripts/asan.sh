#!/usr/bin/env bash
# Build libllama (patched) and the C test with AddressSanitizer + UBSan, and run the C test on
# the generated qwen35, gemma3 and llama models. Takes ~10 minutes on 2 cores; CI runs the same C test
# without sanitizers (tests/test_hook_api.py::test_the_c_api_from_c).
#     bash scripts/asan.sh            # after scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=build/asan
VPY=.venv/bin/python
[ -x "$VPY" ] || { echo "asan: run scripts/setup.sh first" >&2; exit 1; }
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DENGRAM_SANITIZE=ON \
      -DENGRAM_BUILD_TESTS=ON -DGGML_NATIVE=ON -DPython3_EXECUTABLE="$VPY" \
      -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja" > "$BUILD.configure.log"
cmake --build "$BUILD" --target test-engram-c -j "$(nproc)"
MODELS=$("$VPY" -c "
import engram_llama
from research import synth
print(' '.join(str(synth.cached_model(n)) for n in ('qwen35', 'gemma3', 'llama')))")
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
status=0
for m in $MODELS; do
    echo "asan: $(basename "$m")"
    "$BUILD/test-engram-c" "$m" || status=1
done
exit $status
