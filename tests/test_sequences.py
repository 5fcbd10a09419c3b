"""Sequences of one shared context (serve -np): each answers as a context of its own does, its
documents cached per sequence, and sequences decoding in turn (threads) do not disturb each other."""
import threading

import numpy as np
import pytest

from conftest import KERNEL_ATOL
from engram_llama.chunks import read_docs, split
from engram_llama.cli import default_docs, default_model
from engram_llama.runtime import EngramLlama
from engram_llama.sequences import SharedContext
from research import synth

QUESTIONS = ["How much money does a farmer family get each year under PM-KISAN?",
             "What is the health cover per family under Ayushman Bharat?",
             "Which district has its headquarters at Kakkanad?"]


@pytest.fixture(scope="module")
def chunks():
    return split(read_docs(default_docs())[0])


@pytest.fixture(scope="module")
def alone(chunks):
    """The answers of an ordinary engine (llama-cpp-python's Llama), one context of 2048 tokens."""
    eng = EngramLlama(default_model(), n_ctx=2048, n_threads=2)
    try:
        return [eng.ask(q, chunks, max_tokens=24) for q in QUESTIONS]
    finally:
        eng.close()


def _slots(n, path=None, n_ctx=2048):
    shared = SharedContext(path or default_model(), n_ctx * n, n, n_threads=2)
    return shared, [EngramLlama(path or default_model(), llm=shared.sequence(i), hook=shared.hook) for i in range(n)]


def test_a_sequence_of_a_shared_context_answers_as_its_own_context(chunks, alone):
    shared, (a, b) = _slots(2)
    try:
        got = [b.ask(q, chunks, max_tokens=24) for q in QUESTIONS]   # the second sequence, follow-ups reused
        assert got[1].reused[1] > 1000 and got[1].reused[0] == "cache"
    finally:
        a.close(), b.close(), shared.close()
    for g, w in zip(got, alone):
        assert g.text == w.text and g.plan.to_json() == w.plan.to_json() and g.finish_reason == w.finish_reason


def test_a_sequence_ends_the_bias_where_answer_bias_says_as_its_own_context(chunks):
    """Settings.answer_bias (research) on a sequence: the same answers as on llama-cpp-python's Llama."""
    from engram_llama.plan import Settings

    q, runs = QUESTIONS[2], [Settings(strength=8.0, answer_bias=n) for n in (None, 0, 2)]
    eng = EngramLlama(default_model(), n_ctx=2048, n_threads=2)
    try:
        want = [eng.ask(q, chunks, max_tokens=12, settings=s).text for s in runs]
    finally:
        eng.close()
    shared, (a,) = _slots(1)
    try:
        got = [a.ask(q, chunks, max_tokens=12, settings=s).text for s in runs]
    finally:
        a.close(), shared.close()
    assert got == want and want[0] != want[1]


def test_sequences_answering_at_once_equal_one_at_a_time(chunks, alone):
    shared, engines = _slots(3)
    out = [None] * 3

    def run(k):
        out[k] = engines[k].ask(QUESTIONS[k], chunks, max_tokens=24).text

    try:
        threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for e in engines:
            e.close()
        shared.close()
    assert out == [w.text for w in alone]


def test_a_hybrid_sequence_restores_its_documents_beside_another(chunks):
    """qwen35 (Gated DeltaNet): sequence 1's documents come back from its recurrent-state
    checkpoint after sequence 0 answered on other documents in the same context."""
    from test_cache import _ask, _ids

    path = str(synth.cached_model("qwen35"))
    shared, (s0, s1) = _slots(2, path, n_ctx=1024)
    try:
        docs, other, q1, q2 = _ids(s1, 600, 1), _ids(s1, 500, 2), _ids(s1, 20, 3), _ids(s1, 25, 4)
        _ask(s1, docs, q1, n_answer=4)
        _ask(s0, other, q1, n_answer=4)
        reused, logits = _ask(s1, docs, q2)
        assert reused == len(docs) and s1.cache.last[0] == "recurrent state restored"
    finally:
        s0.close(), s1.close(), shared.close()
    fresh = EngramLlama(path, n_ctx=1024, n_threads=2, chat=False)
    try:
        ref = _ask(fresh, docs, q2)[1]
    finally:
        fresh.close()
    np.testing.assert_allclose(logits, ref, rtol=0, atol=KERNEL_ATOL)
    assert np.argmax(logits) == np.argmax(ref)


def test_sampling_keeps_llama_cpp_pythons_chain_and_whole_characters():
    """At a temperature: only tokens inside top-p 0.95 and min-p 0.05 are drawn, the same seed
    gives the same draws; a UTF-8 character cut at the byte level is still open."""
    from types import SimpleNamespace

    from engram_llama.sequences import SeqAdapter, _tail_len

    z = np.full(1000, -30.0, np.float32)
    z[[7, 8, 9]] = [5.0, 4.5, 0.0]            # token 9: p ~ 0.006 < 0.05 x p(7): never drawn
    fake = SimpleNamespace(_logits=z)
    draws = [SeqAdapter._sample(fake, 0.8, np.random.default_rng(s)) for s in range(200)]
    assert set(draws) == {7, 8}
    assert draws == [SeqAdapter._sample(fake, 0.8, np.random.default_rng(s)) for s in range(200)]
    # each filter where it alone binds, and the draw's law: p^(1/T) over the kept tokens, renormalised
    def law(p, kept, n=4000, t=0.5):
        z = np.full(1000, -60.0, np.float32)
        z[:len(p)] = np.log(p)
        fake = SimpleNamespace(_logits=z)
        rng = np.random.default_rng(1)
        got = np.bincount([SeqAdapter._sample(fake, t, rng) for _ in range(n)], minlength=len(p))
        assert set(np.nonzero(got)[0]) == set(range(kept))
        w = np.asarray(p[:kept]) ** (1 / t)
        want = n * w / w.sum()
        assert np.all(np.abs(got[:kept] - want) < 4 * np.sqrt(want))   # 4 sigma of a binomial count
    law([0.5, 0.3, 0.16, 0.04], kept=3)                # top-p: 0.96 with three; min-p (0.025) keeps all four
    law([0.5, 0.4, 0.02] + [0.08 / 37] * 37, kept=2)   # min-p: 0.02 < 0.05 x 0.5, where top-p keeps ~16
    assert SeqAdapter._sample(fake, 0.0, None) == 7
    assert [_tail_len(b) for b in (b"a", "中".encode()[:2], "中".encode(), "😀".encode()[:3])] == [0, 2, 0, 3]
