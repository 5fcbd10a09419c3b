#!/usr/bin/env python3
"""Hook overhead, side by side: unpatched libllama (same llama.cpp commit, built from the same
sdist without the patch) vs patched with the hook cleared vs the bias active on 2 layers vs on
every softmax layer; prefill and decode tokens/s; flash attention on and off. Each measurement
runs in its own process (one libllama per process), variants interleaved, min and median
reported as ratios to unpatched.

    .venv/bin/python scripts/bench_hook.py --ctx 2048 --reps 3            # SmolLM2-135M
    .venv/bin/python scripts/bench_hook.py --model synth:qwen35 --ctx 2048
    .venv/bin/python scripts/bench_hook.py --callgrind --ctx 512     # instructions, not seconds
    # GPU (scripts/device_check.sh): Qwen3.5-2B-shaped Q8_0, all layers offloaded, 8K prompt
    python3 scripts/bench_hook.py --model synth:qwen35-2b:q8_0 --ctx 8192 --n-gpu-layers 99 --inner 3 \
        --unpatched-lib .device/build-cuda/bin-unpatched

--callgrind counts the instructions executed inside llama_decode (valgrind, one thread), which
repeat exactly from run to run, where seconds on a shared VM vary by ±10%.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # research/ (the generated models)
VARIANTS = ["unpatched", "cleared", "active2", "active_all"]


def local_libs() -> tuple[Path, Path]:
    """(patched, unpatched) libllama folders built here by the project's CMakeLists with
    ENGRAM_UNPATCHED_SOURCE, as scripts/device_check.sh does: both link the same ggml libraries
    (built with the same flags as the product's, AMX left out), so only the patch differs.
    Cached per patched tree; the first build takes a few minutes."""
    def tree(*flag):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "llama_source.py"), *flag],
                              check=True, capture_output=True, text=True).stdout.strip()
    src, patched = tree("--unpatched"), tree()
    build = Path(src).parent.parent / f"build-bench-{Path(patched).name}"  # a patch change: a new tree, a new build
    bin_, unp = build / "bin", build / "bin-unpatched"
    if not (build / "build.ninja").exists():
        ninja = Path(sys.executable).parent / "ninja"
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
                        "-DCMAKE_BUILD_TYPE=Release", f"-DPython3_EXECUTABLE={sys.executable}",
                        f"-DENGRAM_LLAMA_SOURCE={patched}", f"-DENGRAM_UNPATCHED_SOURCE={src}"], check=True, stdout=subprocess.DEVNULL)
    # every time: a no-op when nothing changed, a rebuild after csrc/ or patches/ did
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count())], check=True, stdout=subprocess.DEVNULL)
    for f in bin_.glob("libggml*.so*"):  # the unpatched libllama beside the same ggml libraries
        link = unp / f.name
        link.unlink(missing_ok=True)
        link.symlink_to(f)
    return bin_, unp


CHILD = r'''
import ctypes, json, os, sys, time
import numpy as np
variant, model, n_ctx, n_prompt, n_gen, fa = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
ngl, inner = int(sys.argv[7]), int(sys.argv[8])
if sys.platform.startswith("linux"):  # as engram_llama._lib does, for every variant alike
    ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL)
import llama_cpp as lc
_quiet = lc.llama_log_callback(lambda *a: None)  # kept referenced: llama.cpp calls it later
lc.llama_log_set(_quiet, ctypes.c_void_p(0))
mp = lc.llama_model_default_params()
mp.n_gpu_layers = ngl
m = lc.llama_model_load_from_file(model.encode(), mp)
cp = lc.llama_context_default_params()
nt = int(os.environ.get("BENCH_THREADS") or os.cpu_count())
cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = n_ctx, 512, 512, nt, nt
cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if fa else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
ctx = lc.llama_init_from_model(m, cp)
n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(m))
if variant != "unpatched":
    import engram_llama
    from engram_llama import Hook
    h = Hook(ctypes.cast(ctx, ctypes.c_void_p).value)
    if variant != "cleared":
        layers = h.softmax_layers()
        h.set_layers(layers[-2:] if variant == "active2" else layers, 2.0)
        b = np.zeros(n_ctx, np.float32); b[n_prompt // 3: n_prompt // 2] = 2.0
        h.set_bias(b, gate=n_prompt - 32)
ids = np.random.default_rng(0).integers(100, n_vocab - 100, n_prompt + n_gen)
def decode(tokens, pos0):
    for a in range(0, len(tokens), 512):
        part = tokens[a:a+512]
        bt = lc.llama_batch_init(len(part), 0, 1)
        for i, t in enumerate(part):
            bt.token[i], bt.pos[i], bt.n_seq_id[i] = int(t), pos0 + a + i, 1
            bt.seq_id[i][0] = 0; bt.logits[i] = (a + i == len(tokens) - 1)
        bt.n_tokens = len(part)
        assert lc.llama_decode(ctx, bt) == 0
        lc.llama_batch_free(bt)
decode(ids[:64], 0)  # warm-up
best_p = best_d = float("inf")
for _ in range(inner):  # best of `inner` runs in this process (a GPU run is short next to loading the model)
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    t0 = time.perf_counter(); decode(ids[:n_prompt], 0); lc.llama_synchronize(ctx); t1 = time.perf_counter()
    for k in range(n_gen):
        decode(ids[n_prompt + k: n_prompt + k + 1], n_prompt + k)
    lc.llama_synchronize(ctx); t2 = time.perf_counter()
    best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
print(json.dumps({"prefill_tps": n_prompt / best_p, "decode_tps": n_gen / best_d}))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF (default SmolLM2-135M), or synth:NAME")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fa", default="0,1")
    ap.add_argument("--callgrind", action="store_true", help="count instructions in llama_decode (valgrind)")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="layers offloaded to the GPU (99: all)")
    ap.add_argument("--inner", type=int, default=1, help="timed runs per process, best kept")
    ap.add_argument("--unpatched-lib", default=None,
                    help="directory of an unpatched libllama of the same commit, beside the same ggml as the installed "
                         "patched one (default: both built here, sharing one ggml)")
    args = ap.parse_args()
    import engram_llama
    from engram_llama.cli import default_model
    model = args.model or default_model()
    if model.startswith("synth:"):
        from research import synth
        _, name, *quant = model.split(":")
        model = str(synth.cached_model(name, quant=quant[0] if quant else None))
    if args.unpatched_lib:
        libs = {"unpatched": Path(args.unpatched_lib), "patched": engram_llama.lib_path().parent}
    else:
        patched, unpatched = local_libs()
        libs = {"unpatched": unpatched, "patched": patched}
    n_prompt = args.ctx - args.gen - 8
    if args.callgrind:
        return callgrind(model, libs, args, n_prompt)
    res = {}
    for rep in range(args.reps):
        for fa in [int(x) for x in args.fa.split(",")]:
            order = VARIANTS[rep % 4:] + VARIANTS[:rep % 4]  # rotate to spread drift
            for v in order:
                env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(libs["unpatched" if v == "unpatched" else "patched"]))
                env.pop("ENGRAM_LLAMA_LIB_DIR", None)
                if v != "unpatched":
                    env["ENGRAM_LLAMA_LIB_DIR"] = str(libs["patched"])
                out = subprocess.run([sys.executable, "-c", CHILD, v, model, str(args.ctx), str(n_prompt), str(args.gen), str(fa),
                                      str(args.n_gpu_layers), str(args.inner)],
                                     env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    tail = "\n".join(out.stderr.strip().splitlines()[-25:]) or "no output"
                    sys.exit(f"bench child {v} failed ({out.returncode}):\n{tail}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                for k, val in r.items():
                    res.setdefault((fa, v, k), []).append(val)
                print(f"rep {rep} fa {fa} {v:10} prefill {r['prefill_tps']:8.1f} tok/s  decode {r['decode_tps']:7.1f} tok/s",
                      file=sys.stderr, flush=True)
    print(f"\nmodel {Path(model).name}, prompt {n_prompt} tokens, {args.gen} decoded, {args.reps} reps x best of "
          f"{args.inner}, {os.cpu_count()} threads, {args.n_gpu_layers} layers on the GPU")
    print("| FA | variant | prefill tok/s (median) | ratio min / median | decode tok/s (median) | ratio min / median |")
    print("|---|---|---|---|---|---|")
    for fa in [int(x) for x in args.fa.split(",")]:
        for v in VARIANTS:
            cells = []
            for k in ("prefill_tps", "decode_tps"):
                xs, base = res[(fa, v, k)], res[(fa, "unpatched", k)]
                # slowdown ratios: unpatched time / variant time (1.0 = same speed)
                cells.append(f"{statistics.median(xs):.1f}")
                cells.append(f"{max(xs) / max(base):.3f} / {statistics.median(xs) / statistics.median(base):.3f}")
            print(f"| {'on' if fa else 'off'} | {v} | " + " | ".join(cells) + " |")



def callgrind(model, libs, args, n_prompt):
    """Instructions executed inside llama_decode (prefill + decode), per variant, one thread."""
    res = {}
    for fa in [int(x) for x in args.fa.split(",")]:
        for v in VARIANTS:
            env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(libs["unpatched" if v == "unpatched" else "patched"]),
                       BENCH_THREADS="1")
            env.pop("ENGRAM_LLAMA_LIB_DIR", None)
            if v != "unpatched":
                env["ENGRAM_LLAMA_LIB_DIR"] = str(libs["patched"])
            out = subprocess.run(["valgrind", "--tool=callgrind", "--toggle-collect=llama_context::decode(llama_batch const&)",
                                  "--callgrind-out-file=/dev/null", sys.executable, "-c", CHILD, v, model,
                                  str(args.ctx), str(n_prompt), str(args.gen), str(fa), "0", "1"],
                                 env=env, capture_output=True, text=True)
            m = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
            if out.returncode != 0 or not m:
                sys.exit(f"callgrind child {v} failed ({out.returncode}): "
                         f"{(out.stderr.strip().splitlines() or ['no output'])[-1]}")
            res[(fa, v)] = int(m.group(1))
            print(f"fa {fa} {v:10} {res[(fa, v)]:,} instructions in llama_decode", file=sys.stderr, flush=True)
    print(f"\nmodel {Path(model).name}, prompt {n_prompt} tokens + {args.gen} decoded, 1 thread, valgrind callgrind")
    print("| FA | variant | instructions in llama_decode | vs unpatched |")
    print("|---|---|---|---|")
    for fa in [int(x) for x in args.fa.split(",")]:
        for v in VARIANTS:
            r = res[(fa, v)] / res[(fa, "unpatched")] - 1
            print(f"| {'on' if fa else 'off'} | {v} | {res[(fa, v)]:,} | {100 * r:+.4f}% ({res[(fa, v)] - res[(fa, 'unpatched')]:+,}) |")


if __name__ == "__main__":
    main()
