"""Document checkpoints: a follow-up question over cached documents gives the logits of a fresh
prefill of documents + question, bit for bit (flash attention off, the default), on every memory:
dense (cut back), sliding-window (cut back, full-size SWA cache), hybrid Gated DeltaNet (the
recurrent state restored from its partial checkpoint, then cut back) and a document set asked
about earlier (restored from the whole-sequence checkpoint)."""
import ctypes

import numpy as np
import pytest

from conftest import KERNEL_ATOL, gemma3_path
from engram_llama import llama_cpp
from engram_llama._hook import LayerKind
from engram_llama.cache import restore_seq, save_seq
from engram_llama.lowlevel import Context, Model
from engram_llama.runtime import EngramLlama
from research import synth

ARCHS = ["llama", "gemma3", "qwen35"]


def _path(arch):
    if arch == "gemma3-270m":
        p = gemma3_path()
        if p is None:
            pytest.skip("Gemma-3-270M is not installed (scripts/setup.sh installs it)")
        return str(p)
    return str(synth.cached_model(arch))


def _eng(arch, **kw):
    return EngramLlama(_path(arch), n_ctx=2048, n_threads=2, chat=False, **kw)


def _ids(eng, n, seed):
    # ordinary text tokens (a real vocabulary's control tokens would end a turn)
    rng = np.random.default_rng(seed)
    lo = 300 if eng.llm.n_vocab > 1000 else 0
    return [int(t) for t in rng.integers(lo, min(eng.llm.n_vocab, 20000), n)]


def _ask(eng, docs, q, n_answer=0, layers=None, gate=True):
    """Documents + question under a bias on the documents' first tokens (gated at the question),
    greedy answer tokens after it; the logits at the question's last token and the tokens reused."""
    toks = docs + q
    bias = np.zeros(len(toks), np.float32)
    bias[10:60] = 3.0
    soft = [i for i, k in enumerate(eng.hook.kinds) if k != LayerKind.NONE]
    eng.hook.set_layers(layers or soft[-2:], 1.0)
    eng.hook.set_bias(bias, seq_id=0, gate=len(docs) if gate else 0)
    try:
        reused = eng.cache.prefill(toks, docs=len(docs))
        eng.llm.eval(toks[-1:])
        logits = eng.llm.logits()
        for _ in range(n_answer):
            eng.llm.eval([int(np.argmax(eng.llm.logits()))])
    finally:
        eng.hook.clear()
    return reused, logits


def _fresh(arch, docs, q, gate=True):
    eng = _eng(arch)
    try:
        return _ask(eng, docs, q, gate=gate)[1]
    finally:
        eng.close()


@pytest.mark.parametrize("arch", ARCHS + ["gemma3-270m"])
def test_follow_up_on_cached_documents_equals_a_fresh_prefill(arch):
    eng = _eng(arch)
    try:
        docs, q1, q2 = _ids(eng, 700, 1), _ids(eng, 20, 2), _ids(eng, 25, 3)
        assert _ask(eng, docs, q1, n_answer=6)[0] == 0
        reused, logits = _ask(eng, docs, q2)   # after a question and its answer
        assert reused == len(docs)
        if eng.cache.recurrent:  # the documents' recurrent state came back from its partial checkpoint
            assert eng.cache.stats["restored"] == 0 and eng.cache._partial is not None
        # the same question again: decoded again under its bias, from the documents on
        assert _ask(eng, docs, q2)[0] == len(docs)
    finally:
        eng.close()
    assert np.array_equal(logits, _fresh(arch, docs, q2))


@pytest.mark.parametrize("arch", ["qwen35", "gemma3-270m"])
def test_follow_up_with_flash_attention_equals_a_fresh_prefill(arch):
    """The same with llama.cpp's flash-attention kernels (both runs with them on)."""
    eng = _eng(arch, flash_attn=True)
    try:
        docs, q1, q2 = _ids(eng, 700, 1), _ids(eng, 20, 2), _ids(eng, 25, 3)
        _ask(eng, docs, q1, n_answer=6)
        reused, logits = _ask(eng, docs, q2)
        assert reused == len(docs)
    finally:
        eng.close()
    fresh = _eng(arch, flash_attn=True)
    try:
        ref = _ask(fresh, docs, q2)[1]
    finally:
        fresh.close()
    np.testing.assert_allclose(logits, ref, rtol=0, atol=KERNEL_ATOL)


@pytest.mark.parametrize("arch", ["gemma3", "gemma3-270m"])
def test_a_long_answer_past_the_sliding_window_does_not_cost_the_documents_window(arch):
    """A 900-token answer runs far past the documents' last window (Gemma-3: 512 tokens; the
    generated gemma3: 16): the next question still reads the documents' window as a fresh
    prefill does (the cache keeps a full-size window, and the manager checks that it did)."""
    eng = _eng(arch)
    try:
        docs, q1, q2 = _ids(eng, 700, 1), _ids(eng, 20, 2), _ids(eng, 25, 3)
        _ask(eng, docs, q1)
        eng.llm.eval(_ids(eng, 900, 8))   # the long answer, decoded in one go
        reused, logits = _ask(eng, docs, q2)
        assert reused == len(docs)
    finally:
        eng.close()
    assert np.array_equal(logits, _fresh(arch, docs, q2))


@pytest.mark.parametrize("arch", ["llama", "qwen35"])
def test_an_earlier_document_set_is_restored_from_its_checkpoint(arch):
    eng = _eng(arch)
    try:
        a, b, q = _ids(eng, 600, 4), _ids(eng, 500, 5), _ids(eng, 20, 6)
        _ask(eng, a, q, n_answer=3)
        _ask(eng, b, q, n_answer=3)
        assert len(eng.cache.checkpoints) == 2 and eng.cache.checkpoint_bytes > 0
        reused, logits = _ask(eng, a, q)
        assert reused == len(a) and eng.cache.stats["restored"] == 1
        # and then the other set's documents, whose cells the restore replaced
        reused_b, logits_b = _ask(eng, b, q)
        assert reused_b == len(b) and eng.cache.stats["restored"] == 2
    finally:
        eng.close()
    assert np.array_equal(logits, _fresh(arch, a, q))
    assert np.array_equal(logits_b, _fresh(arch, b, q))


def test_the_cap_keeps_no_checkpoint_that_does_not_fit_and_says_so(capfd):
    eng = _eng("qwen35", cache_mib=0)
    try:
        a, b, q = _ids(eng, 600, 4), _ids(eng, 500, 5), _ids(eng, 20, 6)
        _ask(eng, a, q)
        _ask(eng, b, q)
        assert not eng.cache.checkpoints
        reused, logits = _ask(eng, a, q)   # prefilled again
        assert reused == 0
    finally:
        eng.close()
    assert np.array_equal(logits, _fresh("qwen35", a, q))
    eng = _eng("llama")
    eng.cache.cache_bytes = 200 << 10   # a 600-token set's checkpoint is ~0.3 MiB
    try:
        _ask(eng, _ids(eng, 600, 4), q)
        _ask(eng, _ids(eng, 600, 5), q)
        assert not eng.cache.checkpoints
    finally:
        eng.close()
    err = capfd.readouterr().err
    assert err.count("does not fit in --cache-ram (0.2 MiB)") == 1


@pytest.mark.parametrize("arch", ["llama", "qwen35"])
def test_a_checkpoint_that_fails_to_restore_falls_back_to_a_prefill(arch, capfd):
    eng = _eng(arch)
    try:
        a, b, q = _ids(eng, 600, 4), _ids(eng, 500, 5), _ids(eng, 20, 6)
        _ask(eng, a, q)
        _ask(eng, b, q)
        ck = eng.cache.checkpoints[tuple(a)]
        half = bytes(ck.state)[:len(ck.state) // 2]   # a truncated state: llama.cpp refuses it
        ck.state = (ctypes.c_uint8 * len(half)).from_buffer_copy(half)
        reused, logits = _ask(eng, a, q)
        assert reused == 0 and tuple(a) in eng.cache.checkpoints   # prefilled, and kept anew
    finally:
        eng.close()
    assert "did not restore; prefilling the documents again" in capfd.readouterr().err
    assert np.array_equal(logits, _fresh(arch, a, q))


@pytest.mark.parametrize("arch", ["gemma3", "qwen35"])
def test_two_sequences_with_different_documents_in_one_context(arch):
    """Per-sequence checkpoints: documents A and B decoded on sequences 0 and 1 of one context,
    saved, the memory cleared, restored crosswise (A into 1, B into 0); a question on each
    sequence then equals a fresh single-sequence context on those documents."""
    model = Model(synth.cached_model(arch))
    rng = np.random.default_rng(7)
    a, b, q = (list(rng.integers(0, model.n_vocab, n)) for n in (300, 200, 12))

    def alone(docs):
        with Context(model, n_ctx=1024) as c:
            c.decode_seq(docs, 0, all_logits=False)
            return c.decode_seq(q, len(docs))[-1]

    with Context(model, n_ctx=1024, n_seq_max=2) as c:
        c.decode_seq(a, 0, seq=0, all_logits=False)
        c.decode_seq(b, 0, seq=1, all_logits=False)
        sa, sb = save_seq(c.ptr, 0), save_seq(c.ptr, 1)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(c.ptr), True)
        assert restore_seq(c.ptr, sa, 1) and restore_seq(c.ptr, sb, 0)
        on_b = c.decode_seq(q, len(b), seq=0)[-1]
        on_a = c.decode_seq(q, len(a), seq=1)[-1]
    ref_a, ref_b = alone(a), alone(b)
    model.close()
    assert np.array_equal(on_a, ref_a) and np.array_equal(on_b, ref_b)
    assert not np.allclose(ref_a, ref_b)   # the documents matter: the comparison can fail


@pytest.mark.parametrize("arch", ["llama", "qwen35"])
def test_a_failed_restore_over_a_shared_prefix_prefills_from_the_start(arch, capfd):
    """Document sets that share their opening (the instruction, the same first chunks): the cache
    is cut back to the shared part, then a checkpoint that holds more is tried; when it does not
    restore, nothing of the cut cache is left, and the documents are decoded from token 0."""
    eng = _eng(arch)
    try:
        common, q = _ids(eng, 300, 9), _ids(eng, 20, 6)
        a, b = common + _ids(eng, 300, 4), common + _ids(eng, 300, 5)
        _ask(eng, a, q)
        _ask(eng, b, q)
        ck = eng.cache.checkpoints[tuple(a)]
        half = bytes(ck.state)[:len(ck.state) // 2]
        ck.state = (ctypes.c_uint8 * len(half)).from_buffer_copy(half)
        reused, logits = _ask(eng, a, q)
        assert reused == 0
        _ask(eng, b, q)
        q2 = _ids(eng, 20, 7)
        again, logits2 = _ask(eng, a, q2)  # and the checkpoint kept anew is whole
        assert again == len(a)
    finally:
        eng.close()
    assert "did not restore" in capfd.readouterr().err
    assert np.array_equal(logits, _fresh(arch, a, q))
    assert np.array_equal(logits2, _fresh(arch, a, q2))


@pytest.mark.parametrize("arch", ["llama", "qwen35"])
def test_documents_that_extend_a_kept_set_restore_it_and_decode_the_rest(arch):
    eng = _eng(arch)
    try:
        a, b, more, q = _ids(eng, 400, 4), _ids(eng, 400, 5), _ids(eng, 150, 10), _ids(eng, 20, 6)
        _ask(eng, a, q)
        _ask(eng, b, q)              # A's cells replaced; A kept as a checkpoint
        reused, logits = _ask(eng, a + more, q)
        assert reused == len(a) and eng.cache.stats["restored"] == 1
    finally:
        eng.close()
    assert np.array_equal(logits, _fresh(arch, a + more, q))


def test_the_lru_drops_the_oldest_set_first():
    eng = _eng("llama")
    try:
        a, b, c, q = _ids(eng, 400, 4), _ids(eng, 400, 5), _ids(eng, 400, 11), _ids(eng, 20, 6)
        _ask(eng, a, q)
        one = eng.cache.checkpoint_bytes
        eng.cache.cache_bytes = 2 * one + one // 2   # room for two
        _ask(eng, b, q)
        _ask(eng, a, q)              # A used again: B is now the oldest
        _ask(eng, c, q)
        assert set(eng.cache.checkpoints) == {tuple(a), tuple(c)}
        assert _ask(eng, a, q)[0] == len(a) and _ask(eng, b, q)[0] == 0
    finally:
        eng.close()


@pytest.mark.parametrize("arch", ["llama", "qwen35"])
def test_without_the_gate_documents_read_under_a_bias_are_never_reused(arch):
    """--no-gate biases the documents' own queries: their cells depend on the bias, so neither the
    cache nor a checkpoint serves the next question (which prefills again, as a fresh run)."""
    eng = _eng(arch)
    try:
        docs, q1, q2 = _ids(eng, 500, 1), _ids(eng, 20, 2), _ids(eng, 25, 3)
        _ask(eng, docs, q1)                          # gated: documents kept
        assert _ask(eng, docs, q2, gate=False)[0] == 0
        reused, logits = _ask(eng, docs, q1, gate=False)
        assert reused == 0
        # gated again: the cells hold biased documents, but the gated read's checkpoint is whole
        assert _ask(eng, docs, q2)[0] == len(docs) and eng.cache.last[0] == "checkpoint restored"
    finally:
        eng.close()
    assert np.array_equal(logits, _fresh(arch, docs, q1, gate=False))
