"""The question-likelihood reranker against a second code path: each chunk decoded alone on its
own context, full logits copied out and log-softmaxed in numpy."""
import numpy as np
import pytest

from conftest import N_GPU_LAYERS
from engram_llama import likelihood
from engram_llama.chunks import Chunk
from engram_llama.lowlevel import Context, tokenize


def reference(model, scorer, question, chunk):
    """The score from the prompt written out (the source label, the cut, the cue, the question as
    asked: capitalised, with its question mark), tokenized by llama_tokenize directly."""
    tok = lambda text, bos: tokenize(scorer.vocab, text, bos and scorer.add_bos, special=False)  # noqa: E731
    label = f"{chunk.source}. " if chunk.source else ""
    q = tok(" " + question, False)
    ids = tok(label + chunk.text, True)[:likelihood.MAX_CHUNK_TOKENS] + tok("\n\nQuestion:", False) + q
    with Context(model, n_ctx=512, n_batch=512) as ctx:
        logits = ctx.decode_seq(ids).astype(np.float64)
    rows = logits[len(ids) - len(q) - 1:len(ids) - 1]
    m = rows.max(axis=1, keepdims=True)
    logp = rows - m - np.log(np.exp(rows - m).sum(axis=1, keepdims=True))
    return logp[np.arange(len(q)), q].mean()


# random weights leave the chunks' scores ~1e-5 apart, while on a GPU batched and single runs
# differ by up to 5.5e-5 (H200: the kernels change with the batch shape), so these two tests can
# tell a mix-up from noise on the CPU only
cpu_only = pytest.mark.skipif(N_GPU_LAYERS != 0, reason="scores 1e-5 apart, below a GPU's batch-shape noise")


@cpu_only
@pytest.mark.parametrize("arch", ["llama", "qwen35"])
def test_batched_scores_match_one_chunk_at_a_time(models, arch):
    model = models[arch]
    chunks = [Chunk(0, "Kerala floods", "The Kerala floods of 2018 displaced a million people."),
              Chunk(1, "", "PM-KISAN pays Rs 6,000 a year to farmers in three instalments."),
              Chunk(2, "notes.md", "A long chunk. " * 200)]  # cut at MAX_CHUNK_TOKENS
    # two sequences per batch, so three chunks take two batches and reuse the cleared context
    scorer = likelihood.QueryLikelihood(model.ptr, n_seq=2)
    try:
        got = scorer("how much does pm-kisan pay farmers", chunks)
        want = [reference(model, scorer, "How much does pm-kisan pay farmers?", c) for c in chunks]
        assert len(scorer.prefix(chunks[2])) == likelihood.MAX_CHUNK_TOKENS + len(scorer.tokenize("\n\nQuestion:", False))
    finally:
        scorer.close()
    assert got == pytest.approx(want, abs=1e-6)
    # random weights make the scores close to -log(n_vocab), but the chunk still moves them (by
    # ~1e-5 here, ten times the tolerance above), so a mix-up of sequences would show
    assert np.all(got < 0)
    assert np.min(np.abs(np.diff(got))) > 5e-6


@cpu_only
@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen35"])
def test_follow_up_question_restores_chunk_states(models, arch):
    """A second question over the same chunks decodes only the last chunk token and the question
    per chunk (the chunks' states are restored, recurrent layers included) and scores the same as
    the one-chunk reference."""
    model = models[arch]
    chunks = [Chunk(0, "Kerala floods", "The Kerala floods of 2018 displaced a million people."),
              Chunk(1, "", "PM-KISAN pays Rs 6,000 a year to farmers in three instalments."),
              Chunk(2, "notes.md", "Pune is a city in Maharashtra. " * 12)]
    scorer = likelihood.QueryLikelihood(model.ptr, n_seq=2)
    decoded = []
    real = scorer.ctx._decode
    scorer.ctx._decode = lambda toks: (decoded.append(len(toks)), real(toks))[1]
    try:
        scorer("how much does pm-kisan pay farmers", chunks)
        first = sum(decoded)
        decoded.clear()
        q2 = "where is pune"
        got = scorer(q2, chunks[::-1])  # another order: states are found by chunk, not by slot
        want = [reference(model, scorer, "Where is pune?", c) for c in chunks[::-1]]
        n_q = len(scorer.tokenize(" " + likelihood._question(q2), bos=False))
    finally:
        scorer.close()
    assert sum(decoded) == 3 * (1 + n_q)
    assert first > sum(len(scorer.prefix(c)) for c in chunks)
    assert got == pytest.approx(want, abs=1e-6)
    # the chunks move the scores by far more than the tolerance, so a state restored into the
    # wrong sequence would show
    assert np.ptp(want) > 10e-6


def test_question_is_written_as_a_question():
    assert likelihood._question(" who wrote gitanjali ") == "Who wrote gitanjali?"
    assert likelihood._question("Where is Pune?") == "Where is Pune?"
