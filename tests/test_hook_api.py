"""The C API's contract: layer kinds, refusals with their codes and messages, state handling."""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from engram_llama import EngramError, LayerKind
from engram_llama._hook import ffi, lib

from conftest import make_ctx


def test_layer_kinds_follow_the_architecture(models):
    with make_ctx(models["qwen35"]) as c:
        # full attention every 4th layer, the rest Gated DeltaNet
        assert c.hook.kinds == [LayerKind.FULL if (il + 1) % 4 == 0 else LayerKind.NONE for il in range(8)]
    with make_ctx(models["gemma3"]) as c:
        # sliding-window pattern 3: every third layer global
        assert c.hook.kinds == [LayerKind.FULL if (il + 1) % 3 == 0 else LayerKind.SWA for il in range(6)]
    with make_ctx(models["llama"]) as c:
        assert c.hook.kinds == [LayerKind.FULL] * 4


def test_deltanet_layer_is_refused_with_its_reason(models):
    with make_ctx(models["qwen35"]) as c:
        for il in (0, 1, 2, 4):
            with pytest.raises(EngramError) as e:
                c.hook.set_layer(il, 2.0)
            assert e.value.code == lib.LLAMA_ENGRAM_ERR_NO_SOFTMAX
            assert f"layer {il} " in str(e.value) and "no softmax attention" in str(e.value)
        c.hook.set_layer(3, 2.0)
        c.hook.set_layer(7, 1.0)
        assert c.hook.layers() == {3: 2.0, 7: 1.0}


@pytest.mark.parametrize("il", [-1, 8, 1000])
def test_out_of_range_layer(models, il):
    with make_ctx(models["qwen35"]) as c:
        with pytest.raises(EngramError) as e:
            c.hook.set_layer(il, 1.0)
        assert e.value.code == lib.LLAMA_ENGRAM_ERR_LAYER
        assert "out of range" in str(e.value) and "8 layers" in str(e.value)
        assert lib.llama_engram_layer_kind(ffi.cast("struct llama_model *", c.model.ptr), il) == LayerKind.INVALID


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_non_finite_strength(models, scale):
    with make_ctx(models["llama"]) as c:
        with pytest.raises(EngramError) as e:
            c.hook.set_layer(1, scale)
        assert e.value.code == lib.LLAMA_ENGRAM_ERR_VALUE


def test_bad_bias_inputs_are_refused_and_keep_the_previous_bias(models):
    import engram_llama
    with make_ctx(models["llama"], n_ctx=256, n_seq_max=2) as c:
        n_ctx_seq = engram_llama.llama_cpp.llama_n_ctx_seq(c.ptr)
        c.hook.set_layer(0, 1.0)
        good = np.arange(10, dtype=np.float32)
        c.hook.set_bias(good, seq_id=1, gate=3)
        mem = c.hook.mem_size
        cases = [
            (np.array([0.0, np.nan], np.float32), {}, lib.LLAMA_ENGRAM_ERR_VALUE, "not finite"),
            (np.array([np.inf], np.float32), {}, lib.LLAMA_ENGRAM_ERR_VALUE, "not finite"),
            (np.zeros(n_ctx_seq + 1, np.float32), {}, lib.LLAMA_ENGRAM_ERR_LENGTH,
             f"longer than a sequence's context ({n_ctx_seq})"),
            (good, {"seq_id": 2}, lib.LLAMA_ENGRAM_ERR_SEQ, "sequence 2 is out of range"),
            (good, {"seq_id": -1}, lib.LLAMA_ENGRAM_ERR_SEQ, "sequence -1 is out of range"),
            (good, {"gate": -1}, lib.LLAMA_ENGRAM_ERR_VALUE, "gate position -1"),
            (np.zeros((2, 2), np.float32), {}, lib.LLAMA_ENGRAM_ERR_VALUE, "one-dimensional"),
        ]
        for arr, kw, code, msg in cases:
            kw = {"seq_id": 1, **kw}
            with pytest.raises(EngramError) as e:
                c.hook.set_bias(arr, **kw)
            assert e.value.code == code, (kw, str(e.value))
            assert msg in str(e.value)
        assert c.hook.active and c.hook.mem_size == mem
        with pytest.raises(EngramError) as e:
            c.hook.clear(5)
        assert e.value.code == lib.LLAMA_ENGRAM_ERR_SEQ


def test_null_pointers_return_err_null():
    assert lib.llama_engram_set_layer(ffi.NULL, 0, 1.0) == lib.LLAMA_ENGRAM_ERR_NULL
    assert ffi.string(lib.llama_engram_last_error()) == b"context is NULL"
    assert lib.llama_engram_set_seq(ffi.NULL, 0, ffi.NULL, 0, 0) == lib.LLAMA_ENGRAM_ERR_NULL
    assert lib.llama_engram_clear_seq(ffi.NULL, -1) == lib.LLAMA_ENGRAM_ERR_NULL
    assert lib.llama_engram_clear_layers(ffi.NULL) == lib.LLAMA_ENGRAM_ERR_NULL
    assert lib.llama_engram_get_layer(ffi.NULL, 0, ffi.new("float *")) == lib.LLAMA_ENGRAM_ERR_NULL
    assert lib.llama_engram_layer_kind(ffi.NULL, 0) == lib.LLAMA_ENGRAM_LAYER_INVALID
    assert lib.llama_engram_is_active(ffi.NULL) == 0
    assert lib.llama_engram_mem_size(ffi.NULL) == 0


def test_null_bias_with_length(models):
    with make_ctx(models["llama"]) as c:
        assert lib.llama_engram_set_seq(c.hook._ctx, 0, ffi.NULL, 4, 0) == lib.LLAMA_ENGRAM_ERR_NULL
        assert lib.llama_engram_set_seq(c.hook._ctx, 0, ffi.NULL, 0, 0) == lib.LLAMA_ENGRAM_OK
        assert ffi.string(lib.llama_engram_last_error()) == b""


def test_set_layers_is_all_or_nothing(models):
    with make_ctx(models["qwen35"]) as c:
        c.hook.set_layers({3: 1.5})
        with pytest.raises(EngramError):
            c.hook.set_layers({7: 2.0, 2: 2.0})  # 2 is a DeltaNet layer
        assert c.hook.layers() == {3: 1.5}


def test_activity_needs_a_layer_and_a_bias(models):
    with make_ctx(models["llama"], n_seq_max=2) as c:
        h = c.hook
        assert not h.active
        h.set_bias(np.ones(4), seq_id=0)
        assert not h.active  # no layer on
        h.set_layer(2, 1.0)
        assert h.active
        h.set_layer(2, 0.0)
        assert not h.active and h.layers() == {}
        h.set_layer(1, -0.5)  # negative strengths suppress; allowed
        assert h.active
        h.clear(0)
        assert not h.active
        h.set_bias(np.ones(4), seq_id=1)
        h.clear()
        assert not h.active
        h.set_bias(np.ones(4), seq_id=0)
        h.clear_layers()
        assert not h.active and h.layers() == {}


def _rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_10000_set_clear_cycles_keep_memory_flat(models):
    with make_ctx(models["qwen35"], n_ctx=8192, n_seq_max=2) as c:
        h = c.hook
        bias = np.random.default_rng(0).normal(size=4096).astype(np.float32)
        h.set_layers({3: 1.0, 7: 2.0})
        for _ in range(200):  # warm up allocator pools
            h.set_bias(bias, seq_id=1, gate=100)
            h.clear(1)
        base_mem = h.mem_size
        before = _rss_kb()
        for i in range(10_000):
            h.set_bias(bias[: 1 + i % 4096], seq_id=i % 2, gate=i % 50)
            if i % 3 == 0:
                h.set_layer(3, 1.0 + (i % 5))
            h.clear(None if i % 2 else i % 2)
        after = _rss_kb()
        h.clear()
        assert h.mem_size == base_mem  # nothing held for sequences after clearing
        assert after - before < 1024, f"RSS grew by {after - before} KiB over 10,000 cycles"


def test_bias_storage_is_linear_in_length(models):
    with make_ctx(models["llama"], n_ctx=4096) as c:
        h = c.hook
        h.set_bias(np.zeros(1000, np.float32))
        m1 = h.mem_size
        h.set_bias(np.zeros(4000, np.float32))
        m4 = h.mem_size
        assert m4 - m1 == 3000 * 4


def test_text_modules_import_without_libllama():
    """The text side (chunks, table, extract, relevance, plan) imports without the native library;
    the first use of llama_cpp loads it."""
    code = textwrap.dedent("""
        import os
        maps = lambda: [l for l in open("/proc/self/maps") if "libllama" in l]
        import engram_llama, engram_llama.chunks, engram_llama.table, engram_llama.relevance, engram_llama.plan
        assert not maps(), maps()
        from engram_llama import llama_cpp
        assert maps() and hasattr(llama_cpp.llama_cpp._lib, "llama_engram_version")
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_import_refuses_a_foreign_libllama(tmp_path):
    """Another libllama already mapped in the process: loading the patched one fails with one line."""
    import engram_llama
    fake = tmp_path / "libllama.so"
    fake.write_bytes((engram_llama.lib_path().parent / "libggml-base.so").read_bytes())
    code = textwrap.dedent(f"""
        import ctypes
        ctypes.CDLL({str(fake)!r})
        from engram_llama import llama_cpp
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "EngramImportError" in last and "unpatched libllama is already loaded" in last and str(fake) in last


def test_topology_changes_re_plan_the_context_once(models):
    """Turning the bias on, changing its layers, or turning it off re-plans the context's
    worst-case graph once (llama.cpp's sched_reserve, which logs "reserving"); new bias values or
    more ubatches do not. Without the re-plan, ggml-alloc re-planned and reallocated its buffers on
    every ubatch of a prefill whose graph the plan did not cover (docs/PERFORMANCE.md, GPU)."""
    import ctypes

    from engram_llama import lowlevel, llama_cpp

    m = models["qwen35"]
    seen = []
    cb = llama_cpp.llama_log_callback(lambda level, text, ud: seen.append(text.decode(errors="replace")))
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    try:
        with make_ctx(m, n_ctx=512, n_batch=256, n_ubatch=64) as c:
            ids = [(7 * i) % 200 + 1 for i in range(256)]
            layers = c.hook.softmax_layers()

            def plans(step):
                seen.clear()
                step()
                c.clear_kv()
                c.decode_seq(ids, all_logits=False)  # 4 ubatches, the KV view growing
                return sum("reserving ..." in s for s in seen)

            assert plans(lambda: None) == 0
            assert plans(lambda: (c.hook.set_layers(layers[:1], 2.0), c.hook.set_bias(np.ones(256, np.float32)))) == 1
            assert plans(lambda: c.hook.set_bias(np.full(256, 3.0, np.float32))) == 0  # same graph
            assert plans(lambda: c.hook.set_layers(layers, 2.0)) == 1
            assert plans(lambda: c.hook.clear()) == 1
            assert plans(lambda: None) == 0
    finally:
        lowlevel._quiet_cb = None
        lowlevel.quiet_logs()


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_int8" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has_amx(), reason="the CPU has no AMX")
def test_build_leaves_out_ggml_amx_on_an_amx_cpu():
    """ggml's AMX matmul segfaults at the first decode (CMakeLists.txt, ENGRAM_AMX); -march=native
    would compile it in on this CPU."""
    import ctypes
    import engram_llama
    cpu = ctypes.CDLL(os.path.join(os.path.dirname(engram_llama.lib_path()), "libggml-cpu.so"))
    assert cpu.ggml_cpu_has_avx512() == 1 and cpu.ggml_cpu_has_amx_int8() == 0


def test_the_c_api_from_c(tmp_path):
    """csrc/tests/test-engram-c.c, the C test scripts/asan.sh runs under sanitizers, compiled against
    the patched headers and the built libllama and run on each generated architecture: every
    refusal path, set/clear cycles, decodes with the bias on and off, teardown with state held."""
    import shutil

    from engram_llama._lib import lib_dir
    from research import synth

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    import conftest

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the patched tree scripts/setup.sh built from, in the user's cache (the tests' own is empty)
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_LLAMA_CACHE"}
    if conftest.USER_CACHE is not None:
        env["ENGRAM_LLAMA_CACHE"] = conftest.USER_CACHE
    src = subprocess.run([sys.executable, os.path.join(root, "scripts", "llama_source.py")], capture_output=True,
                         text=True, check=True, env=env).stdout.strip()
    lib = str(lib_dir())
    exe = tmp_path / "test-engram-c"
    subprocess.run([cc, "-O1", "-std=c11", os.path.join(root, "csrc", "tests", "test-engram-c.c"), "-o", str(exe),
                    "-I", os.path.join(root, "csrc"), "-I", os.path.join(src, "include"),
                    "-I", os.path.join(src, "ggml", "include"), "-L", lib, "-lllama", f"-Wl,-rpath,{lib}", "-lm"],
                   check=True, capture_output=True, text=True)
    for name in ("qwen35", "gemma3", "llama"):
        r = subprocess.run([str(exe), str(synth.cached_model(name))], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "all checks passed" in r.stdout, (name, r.stdout, r.stderr[-2000:])


def test_a_hook_refuses_calls_once_its_context_is_closed(models):
    """A call after the context was freed (a thread outliving a close) is an EngramError, not a
    write into freed memory: for a context of our own and for llama-cpp-python's Llama."""
    from research import synth
    from engram_llama.adapter import LlamaAdapter

    ctx = make_ctx(models["llama"])
    hook = ctx.hook
    hook.set_layer(0, 1.0)
    ctx.close()
    with pytest.raises(EngramError, match="closed"):
        hook.clear(0)
    llm = LlamaAdapter(synth.cached_model("llama"), 256)
    from engram_llama import Hook

    hook = Hook(llm)
    hook.set_bias(np.ones(4, dtype=np.float32), seq_id=0, gate=2)
    llm.close()
    for call in (lambda: hook.clear(0), lambda: hook.set_layer(0, 1.0), lambda: hook.active):
        with pytest.raises(EngramError, match="closed"):
            call()
