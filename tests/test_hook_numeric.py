"""The bias does exactly what the header says, on the real graphs of three architectures.

References are independent of the C code: numpy softmax over the captured Q*K^T, the captured V
rows, and runs of the same model without the hook, with other batch shapes or other kernels.
"""
import re

import numpy as np
import pytest

from engram_llama import LayerKind
from engram_llama.lowlevel import Token

from conftest import ARCHS, KERNEL_ATOL, N_GPU_LAYERS, make_ctx, tokens

N = 48  # prompt length of the tests


@pytest.fixture(autouse=True, params=["host", "graph"])
def mask_path(request, monkeypatch):
    """Every test here runs on both ways of building the biased mask (csrc/engram-graph.cpp):
    filled on the host (the CPU's default) and computed in the graph (a GPU's default)."""
    monkeypatch.setenv("ENGRAM_LLAMA_MASK", request.param)
    return request.param


def agree(a, b, effect):
    """a and b agree far more closely than the bias moves the logits: on random weights that move
    can be a few 1e-4 (qwen35), near KERNEL_ATOL itself, so on the CPU the bound is a twentieth of
    it (measured: agreement within 2.5e-6, effects 2.5e-4 and up); a GPU's kernels keep their own."""
    assert effect > 1e-5, f"the bias did not move the logits ({effect})"
    atol = KERNEL_ATOL if N_GPU_LAYERS else min(KERNEL_ATOL, 0.05 * effect)
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def first_layer(ctx, kind=LayerKind.FULL):
    return ctx.hook.softmax_layers([kind])[0]


def causal_mask(n_tokens, n_kv, n_swa=0, start=0):
    q = start + np.arange(n_tokens)[:, None]
    k = np.arange(n_kv)[None, :]
    keep = (k <= q) & (k < start + n_tokens)
    if n_swa:
        keep &= (q - k) < n_swa
    return np.where(keep, 0.0, -np.inf)


def capture_all(name):
    return name.split("-")[0] in ("kq", "kq_soft_max", "kqv_out", "Vcur", "Kcur")


@pytest.mark.parametrize("fa", [False, True])
def test_zero_and_cleared_bias_are_bit_identical(arch_model, fa):
    _, m = arch_model
    ids = tokens(m, N)
    with make_ctx(m, flash_attn=fa) as c:
        ref = c.decode_seq(ids)
        layers = c.hook.softmax_layers()
        # a zero bias on every softmax layer: the biased masks equal the model's masks
        c.clear_kv()
        c.hook.set_layers(layers, 2.0)
        c.hook.set_bias(np.zeros(N, np.float32), gate=0)
        assert c.hook.active
        assert np.array_equal(c.decode_seq(ids), ref)
        # a real bias, then cleared: back to the unpatched graph
        c.clear_kv()
        c.hook.set_bias(np.random.default_rng(1).normal(size=N).astype(np.float32), gate=0)
        biased = c.decode_seq(ids)
        assert not np.array_equal(biased, ref)
        c.hook.clear()
        c.clear_kv()
        assert np.array_equal(c.decode_seq(ids), ref)
        c.hook.clear_layers()
        c.clear_kv()
        assert np.array_equal(c.decode_seq(ids), ref)


@pytest.mark.parametrize("arch,kind", [("llama", LayerKind.FULL), ("qwen35", LayerKind.FULL),
                                       ("gemma3", LayerKind.FULL), ("gemma3", LayerKind.SWA)])
def test_biased_probabilities_match_numpy_softmax(models, arch, kind):
    m = models[arch]
    ids = tokens(m, N)
    bias = np.random.default_rng(2).normal(0, 1.5, N).astype(np.float32)
    w = 1.5
    with make_ctx(m, capture=capture_all) as c:
        L = c.hook.softmax_layers([kind])[1 if kind == LayerKind.SWA else 0]
        softmax_layers = c.hook.softmax_layers()
        c.decode_seq(ids)
        plain = {k: v[0] for k, v in c.captured.items()}
        c.clear_kv()
        c.hook.set_layer(L, w)
        c.hook.set_bias(bias, gate=0)
        c.decode_seq(ids)
        biased = {k: v[0] for k, v in c.captured.items()}
        scale = c.op_params[f"kq_soft_max-{L}"][0]

    n_swa = 16 if kind == LayerKind.SWA else 0  # synth gemma3 window
    for il in softmax_layers:
        if il < L:  # layers before the biased one see nothing of it
            assert np.array_equal(biased[f"kq_soft_max-{il}"], plain[f"kq_soft_max-{il}"])
    kq = biased[f"kq-{L}"]
    assert np.array_equal(kq, plain[f"kq-{L}"])  # same scores going in
    n_kv = kq.shape[-1]
    mask = causal_mask(N, n_kv, n_swa)
    b = np.zeros(n_kv)
    b[:N] = w * bias
    # the reference itself is validated on the unbiased run
    np.testing.assert_allclose(plain[f"kq_soft_max-{L}"], softmax(kq * scale + mask), rtol=0, atol=2e-6)
    np.testing.assert_allclose(biased[f"kq_soft_max-{L}"], softmax(kq * scale + mask + b), rtol=0, atol=2e-6)
    assert np.abs(biased[f"kq_soft_max-{L}"] - plain[f"kq_soft_max-{L}"]).max() > 0.05


@pytest.mark.parametrize("fa", [False, True])
def test_minus_1e9_everywhere_but_one_key_selects_its_value(arch_model, fa):
    arch, m = arch_model
    ids = tokens(m, N)
    j = 7
    bias = np.full(N, -1e9, np.float32)
    bias[j] = 0.0
    with make_ctx(m, flash_attn=fa, capture=lambda n: n.startswith(("kqv_out-", "attn_pregate-", "Vcur-"))) as c:
        L = first_layer(c)
        c.hook.set_layer(L, 1.0)
        c.hook.set_bias(bias, gate=0)
        c.decode_seq(ids)
        # qwen35 names the attention output "attn_pregate" (before its output gate)
        out = (c.captured.get(f"kqv_out-{L}") or c.captured[f"attn_pregate-{L}"])[0]
        v = c.captured[f"Vcur-{L}"][-1]  # the last "Vcur" is the one attention reads
    v = v.reshape(N, -1, v.shape[-1])          # [token, kv head, dim]
    n_head_kv, d = v.shape[1], v.shape[2]
    out = out.reshape(N, -1, d)                # [token, head, dim]
    n_head = out.shape[1]
    expect = np.repeat(v[j][None], N, 0)[:, np.arange(n_head) // (n_head // n_head_kv)]
    # attention reads V back from the F16 KV cache: equal up to F16 rounding (2^-11 relative)
    np.testing.assert_allclose(out[j:], expect[j:], rtol=0, atol=2 ** -10 * np.abs(v[j]).max())


@pytest.mark.parametrize("fa", [False, True])
@pytest.mark.parametrize("strength,value", [(1.0, 1e5), (1e30, 1e10)])
def test_a_huge_bias_on_one_key_selects_its_value_and_stays_finite(arch_model, fa, strength, value):
    """+1e5 is past F16's largest (flash attention's mask) and 1e30 x 1e10 past F32's: kept finite
    (csrc's ENGRAM_BIAS_MAX), the key is selected as -1e9 on the others selects it, and no NaN
    reaches the queries before it (the bias is gated from 0; causality hides the key from them)."""
    arch, m = arch_model
    ids = tokens(m, N)
    j = 7
    bias = np.zeros(N, np.float32)
    bias[j] = value
    with make_ctx(m, flash_attn=fa, capture=lambda n: n.startswith(("kqv_out-", "attn_pregate-", "Vcur-"))) as c:
        L = first_layer(c)
        c.hook.set_layer(L, strength)
        c.hook.set_bias(bias, gate=0)
        logits = c.decode_seq(ids)
        out = (c.captured.get(f"kqv_out-{L}") or c.captured[f"attn_pregate-{L}"])[0]
        v = c.captured[f"Vcur-{L}"][-1]
    assert np.isfinite(logits).all() and np.isfinite(out).all()
    v = v.reshape(N, -1, v.shape[-1])
    n_head_kv, d = v.shape[1], v.shape[2]
    out = out.reshape(N, -1, d)
    expect = np.repeat(v[j][None], N, 0)[:, np.arange(out.shape[1]) // (out.shape[1] // n_head_kv)]
    np.testing.assert_allclose(out[j:], expect[j:], rtol=0, atol=2 ** -10 * np.abs(v[j]).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_flash_attention_agrees_with_plain_attention(models, arch):
    m = models[arch]
    ids = tokens(m, N)
    bias = np.random.default_rng(3).normal(0, 2, N).astype(np.float32)
    out = {}
    for fa in (False, True):
        with make_ctx(m, flash_attn=fa) as c:
            c.hook.set_layers(c.hook.softmax_layers(), 2.0)
            c.hook.set_bias(bias, gate=N // 2)
            out[fa] = c.decode_seq(ids)
            c.hook.clear()
            c.clear_kv()
            out[(fa, "plain")] = c.decode_seq(ids)
    effect = np.abs(out[False] - out[(False, "plain")]).max()
    assert effect > 1e-4
    # the kernels differ by F16 rounding of K/V and the mask, far below the bias's own effect
    assert np.abs(out[True] - out[False]).max() < 0.05 * effect + 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_ubatch_1_and_512_agree(models, arch):
    m = models[arch]
    ids = tokens(m, N)
    bias = np.random.default_rng(4).normal(0, 2, N).astype(np.float32)
    out = {}
    for ub in (1, 512):
        with make_ctx(m, n_ubatch=ub) as c:
            c.hook.set_layers(c.hook.softmax_layers(), 2.0)
            c.hook.set_bias(bias, gate=10)
            out[ub] = c.decode_seq(ids)
            c.hook.clear()
            c.clear_kv()
            out[(ub, "plain")] = c.decode_seq(ids)
    # measured against the bias's own effect: a bias lost on both paths would not pass
    agree(out[1], out[512], np.abs(out[512] - out[(512, "plain")]).max())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("unified", [False, True])
def test_two_sequences_in_one_batch_match_their_single_runs(models, arch, unified):
    m = models[arch]
    ids = [tokens(m, N, seed=10), tokens(m, N - 8, seed=11)]
    rng = np.random.default_rng(5)
    biases = [rng.normal(0, 2, N).astype(np.float32), rng.normal(0, 2, N - 8).astype(np.float32)]
    gates = [20, 0]
    single, effects = [], []
    for s in range(2):
        with make_ctx(m) as c:
            c.hook.set_layers(c.hook.softmax_layers(), 1.5)
            c.hook.set_bias(biases[s], gate=gates[s])
            single.append(c.decode_seq(ids[s]))
            c.hook.clear()
            c.clear_kv()
            effects.append(np.abs(single[-1] - c.decode_seq(ids[s])).max())
    with make_ctx(m, n_seq_max=2, kv_unified=unified) as c:
        c.hook.set_layers(c.hook.softmax_layers(), 1.5)
        for s in range(2):
            c.hook.set_bias(biases[s], seq_id=s, gate=gates[s])
        # interleave the two sequences' tokens in one batch
        batch = []
        for i in range(N):
            for s in range(2):
                if i < len(ids[s]):
                    batch.append(Token(int(ids[s][i]), i, s))
        logits = c.decode(batch)
    got = [logits[[k for k, t in enumerate(batch) if t.seq == s]] for s in range(2)]
    for s in range(2):
        agree(got[s], single[s], effects[s])


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_leaves_document_kv_untouched(models, arch):
    m = models[arch]
    ids = tokens(m, N)
    g = 30
    bias = np.random.default_rng(6).normal(0, 2, N).astype(np.float32)
    runs = {}
    for name, gate in (("plain", None), ("gated", g), ("ungated", 0)):
        with make_ctx(m, capture=lambda n: n.startswith(("Kcur-", "Vcur-"))) as c:
            if gate is not None:
                c.hook.set_layers(c.hook.softmax_layers(), 2.0)
                c.hook.set_bias(bias, gate=gate)
            # every "Kcur"/"Vcur" stage (projection, norm, rope) up to what the cache stores
            runs[name] = (c.decode_seq(ids), {f"{k}#{i}": x for k, v in c.captured.items() for i, x in enumerate(v)})
            first = c.hook.softmax_layers()[0]
    plain, gated, ungated = runs["plain"], runs["gated"], runs["ungated"]

    def docs(x):  # the document tokens' rows, whatever the tensor layout (token-major memory)
        if N not in x.shape:
            x = x.reshape(N, -1)
        return np.take(x, range(g), axis=list(x.shape).index(N))

    # document rows: identical logits and identical K/V at every layer
    assert np.array_equal(gated[0][:g], plain[0][:g])
    for name, kv in gated[1].items():
        assert np.array_equal(docs(kv), docs(plain[1][name])), name
    assert not np.array_equal(gated[0][g:], plain[0][g:])
    # ungated, the documents' K/V after the first biased layer change
    later = [k for k in ungated[1] if int(re.search(r"-(\d+)", k).group(1)) > first]
    assert later and any(not np.array_equal(docs(ungated[1][k]), docs(plain[1][k])) for k in later)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_documents_plus_gated_question_equal_one_pass(models, arch):
    """Prefill the documents once, then decode the question on top: same as a single pass."""
    m = models[arch]
    ids = tokens(m, N)
    g = 32
    bias = np.random.default_rng(7).normal(0, 2, N).astype(np.float32)
    with make_ctx(m) as c:
        c.hook.set_layers(c.hook.softmax_layers(), 2.0)
        c.hook.set_bias(bias, gate=g)
        one = c.decode_seq(ids)
        c.clear_kv()
        c.hook.clear()  # documents prefilled without any bias...
        c.decode_seq(ids[:g])
        c.hook.set_bias(bias, gate=g)  # ...the question sees it
        two = c.decode_seq(ids[g:], start=g)
        c.clear_kv()
        c.hook.clear()
        plain = c.decode_seq(ids)
    agree(two, one[g:], np.abs(one[g:] - plain[g:]).max())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_kv_reuse_across_bias_settings(models, arch):
    """One document prefill serves several bias settings (attention-only memories can roll back)."""
    import engram_llama
    lc = engram_llama.llama_cpp
    m = models[arch]
    ids = tokens(m, N)
    g = 32
    rng = np.random.default_rng(8)
    settings = [rng.normal(0, 2, N).astype(np.float32) for _ in range(3)]
    fresh = []
    for b in settings:
        with make_ctx(m) as c:
            c.hook.set_layers(c.hook.softmax_layers(), 2.0)
            c.hook.set_bias(b, gate=g)
            fresh.append(c.decode_seq(ids)[g:])
    with make_ctx(m) as c:
        c.hook.set_layers(c.hook.softmax_layers(), 2.0)
        c.decode_seq(ids[:g])
        for i, (b, want) in enumerate(zip(settings, fresh)):
            c.hook.set_bias(b, gate=g)
            got = c.decode_seq(ids[g:], start=g)
            # against how far the settings move the logits apart: a stale bias would not pass
            apart = min(np.abs(want - other).max() for j, other in enumerate(fresh) if j != i)
            agree(got, want, apart)
            assert lc.llama_memory_seq_rm(lc.llama_get_memory(c.ptr), 0, g, -1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fa", [False, True])
def test_switching_biased_layers_matches_fresh_contexts(models, arch, fa):
    """Changing the biased layers in a live context gives what a fresh context gives.

    Configurations with the same number of graph nodes and leaves (one biased layer here, another
    there) once crashed ggml-alloc, which reused the previous allocation plan; the hook re-plans.
    """
    m = models[arch]
    ids = tokens(m, N)
    bias = np.random.default_rng(9).normal(0, 2, N).astype(np.float32)
    with make_ctx(m) as probe:
        layers = probe.hook.softmax_layers()
    configs = [{layers[0]: 2.0}, {layers[-1]: 2.0}, {layers[0]: 1.0}, {il: 2.0 for il in layers},
               {layers[-1]: 2.0}, {}, {layers[0]: 2.0}]
    fresh = []
    for cfg in configs:
        with make_ctx(m, flash_attn=fa) as c:
            c.hook.set_layers(cfg)
            c.hook.set_bias(bias, gate=8)
            fresh.append(c.decode_seq(ids))
    with make_ctx(m, flash_attn=fa) as c:
        c.hook.set_bias(bias, gate=8)
        for cfg, want in zip(configs, fresh):
            c.hook.set_layers(cfg)
            c.clear_kv()
            assert np.array_equal(c.decode_seq(ids), want), cfg
