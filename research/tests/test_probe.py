"""The attention probe: the share it reads is the share the hook's bias acts on.

The reference is the softmax algebra, not the probe itself: adding b to the logits of a span whose
share is m gives it m e^b / (m e^b + 1 - m), exactly, per head and query, at the first biased layer
(whose queries and keys the bias cannot have changed). A probe reading the wrong tensor, layer or
key cells, or a bias landing on other cells than the probe measured, breaks the identity.
"""
import math

import numpy as np
import pytest

from engram_llama import Hook, llama_cpp
from engram_llama.plan import default_layers
from research import synth
from research.probe import (MAX_STRENGTH, AttentionProbe, installed, strength_for, strength_for_share,
                            strength_over_rival, strengths)

from conftest import ARCHS, tokens

N_PREFIX, N_QUERY, SPAN = 48, 6, (20, 36)


def test_strength_for_by_hand():
    # log(T (1 - m) / (m (1 - T)))
    assert strength_for(0.01, 0.2) == pytest.approx(math.log(0.2 * 0.99 / (0.01 * 0.8)), abs=1e-12)
    assert strength_for(0.05, 0.35) == pytest.approx(math.log(0.35 * 0.95 / (0.05 * 0.65)), abs=1e-12)
    assert strength_for(0.4, 0.2) == 0.0           # already above the target: no bias, never a negative one
    assert strength_for(1e-12, 0.5) == MAX_STRENGTH
    assert strength_for(0.0, 0.5, cap=3.0) == 3.0


def test_strength_over_rival_by_hand():
    # log(rival / m0) + margin: a chunk at 1% against a rival at 5% needs log 5 to draw level
    assert strength_over_rival(0.01, 0.05, 1.0) == pytest.approx(math.log(5) + 1, abs=1e-12)
    assert strength_over_rival(0.2, 0.05, 1.0) == 0.0        # already e^1.39 ahead of it: no bias
    assert strength_over_rival(1e-6, 0.5, 2.0) == MAX_STRENGTH
    # the identity it rests on: after the bias, the chunk's weight is e^margin times the rival's
    m0, r, d = 0.004, 0.03, 1.5
    b = strength_over_rival(m0, r, d)
    assert m0 * math.exp(b) / r == pytest.approx(math.exp(d), rel=1e-12)


def test_strengths_one_for_all_layers_or_each_its_own():
    share = {3: 0.01, 7: 0.03, 11: 0.5}
    # the mean share of layers 3 and 7 is 0.02: log(0.4 * 0.98 / (0.02 * 0.6))
    one = math.log(0.4 * 0.98 / (0.02 * 0.6))
    assert strengths(share, [3, 7], 0.4) == {3: pytest.approx(one, abs=1e-12), 7: pytest.approx(one, abs=1e-12)}
    each = strengths(share, [3, 7, 11], 0.4, per_layer=True)
    assert each[3] == pytest.approx(math.log(0.4 * 0.99 / (0.01 * 0.6)), abs=1e-12) and each[11] == 0.0
    with pytest.raises(RuntimeError, match="flash attention"):
        strengths(share, [3, 15], 0.4)


def test_share_over_all_heads_or_the_ones_that_read_the_span_most():
    probe = AttentionProbe()
    # one layer, 3 heads, two decodes of 1 and 2 queries, 5 key cells; the span is cells [1, 3)
    a = np.zeros((1, 3, 1, 5), np.float32)
    a[0, :, 0, 1:3] = [[0.1, 0.1], [0.3, 0.2], [0.0, 0.05]]
    b = np.zeros((1, 3, 2, 5), np.float32)
    b[0, :, :, 1] = [[0.2, 0.4], [0.1, 0.1], [0.05, 0.05]]
    probe.rows = {7: [a, b]}
    # per head, the share per query: [0.2, 0.2, 0.4], [0.5, 0.1, 0.1], [0.05, 0.05, 0.05]
    head_means = [0.8 / 3, 0.7 / 3, 0.05]
    assert probe.share((1, 3))[7] == pytest.approx(np.mean(head_means), abs=1e-6)
    assert probe.share((1, 3), heads=1)[7] == pytest.approx(0.8 / 3, abs=1e-6)
    assert probe.share((1, 3), heads=2)[7] == pytest.approx(0.75 / 3, abs=1e-6)
    assert probe.share((1, 3), heads=9)[7] == pytest.approx(np.mean(head_means), abs=1e-6)


def _decode(llm, ids, pos0):
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        for i, t in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(t), pos0 + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(ids) - 1
        batch.n_tokens = len(ids)
        assert llama_cpp.llama_decode(llm.ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)


def _read(llm, probe, layer, ids):
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    _decode(llm, ids[:N_PREFIX], 0)
    with probe.reading([layer]):
        _decode(llm, ids[N_PREFIX:], N_PREFIX)
    return probe.shares(SPAN)[layer]


@pytest.mark.parametrize("arch", ARCHS)
def test_biased_share_follows_the_softmax_identity(arch, models):
    probe = AttentionProbe()
    with installed(probe):
        llm = llama_cpp.Llama(model_path=str(synth.cached_model(arch)), n_ctx=256, n_threads=2, verbose=False)
    try:
        hook = Hook(llm)
        layer = default_layers(hook.kinds)[0]
        ids = tokens(models[arch], N_PREFIX + N_QUERY, seed=3)
        m0 = _read(llm, probe, layer, ids)
        assert m0.shape[1] == N_QUERY and np.all((m0 > 0) & (m0 < 1))
        # the strength that takes head 0's first query to 40%, on the span, at this layer alone
        b = strength_for(float(m0[0, 0]), 0.4)
        assert 0 < b < MAX_STRENGTH
        vec = np.zeros(N_PREFIX, np.float32)
        vec[SPAN[0]:SPAN[1]] = 1.0
        hook.set_layers({layer: b})
        hook.set_bias(vec, gate=N_PREFIX)
        m1 = _read(llm, probe, layer, ids)
        hook.clear()
        expect = m0 * math.exp(b) / (m0 * math.exp(b) + 1 - m0)
        np.testing.assert_allclose(m1, expect, atol=2e-5)
        assert m1[0, 0] == pytest.approx(0.4, abs=2e-5)
        # other layers are not read, and a disarmed probe reads nothing
        assert set(probe.rows) == {layer}
        _decode(llm, ids[-1:], N_PREFIX + N_QUERY)
        assert set(probe.rows) == {layer} and sum(p.shape[2] for p in probe.rows[layer]) == N_QUERY
    finally:
        llm.close()


def test_installed_restores_the_default_parameters():
    import llama_cpp.llama_cpp as low

    probe = AttentionProbe()
    with pytest.raises(RuntimeError):
        with installed(probe):
            assert low.llama_context_default_params().cb_eval
            raise RuntimeError("boom")
    assert not low.llama_context_default_params().cb_eval


@pytest.mark.parametrize("arch", ARCHS)
def test_peek_leaves_the_documents_as_it_found_them(arch, models):
    """The cache manager's peek decodes the question and takes it back out: by cutting the cache
    (attention-only models) or by restoring the documents' state (recurrent layers, qwen35). The
    question decoded after it must give the logits of a clean decode, and the probe's strength must
    be the one a clean read of the share gives."""
    from engram_llama.align import Prompt
    from engram_llama.runtime import EngramLlama
    from conftest import KERNEL_ATOL

    probe = AttentionProbe()
    eng = EngramLlama(str(synth.cached_model(arch)), n_ctx=256, n_threads=2, chat=False, cb_eval=probe.callback)
    try:
        ids = [int(t) for t in tokens(models[arch], N_PREFIX + N_QUERY, seed=5)]
        prompt = Prompt(text="", tokens=ids, chunk_order=[0], chunk_chars={0: (0, 0)}, chunk_tokens={0: SPAN},
                        question_token=N_PREFIX, offsets=[], n_prefix=0)
        layers = default_layers(eng.hook.kinds)
        b = strength_for_share(eng, probe, prompt, 0, layers, 0.4)
        mem = eng.llm.memory
        assert eng.llm.n_cached == N_PREFIX and llama_cpp.llama_memory_seq_pos_max(mem, 0) == N_PREFIX - 1
        eng.llm.eval(ids[N_PREFIX:])
        after = eng.llm.logits()
        # the clean path: documents into a cleared cache, then the question, read by the probe
        eng.llm.clear()
        eng.llm.eval(ids[:N_PREFIX])
        with probe.reading(layers):
            eng.llm.eval(ids[N_PREFIX:])
        clean = eng.llm.logits()
        share = probe.share(SPAN)
        np.testing.assert_allclose(after, clean, atol=KERNEL_ATOL)
        assert b == pytest.approx(strength_for(float(np.mean([share[il] for il in layers])), 0.4), abs=1e-6)
        assert 0 < b < MAX_STRENGTH
    finally:
        eng.close()
