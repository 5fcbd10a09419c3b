"""Thinking models: the real Qwen3.5 chat templates (tests/data, with their sources) render with
thinking off unless asked; --think keeps the <think> part out of the answer; `engram-llama run`
end to end on a generated Qwen3.5 hybrid GGUF that carries the real template."""
import json

import numpy as np
import pytest

from conftest import ROOT
from engram_llama import align
from engram_llama.chunks import Chunk, read_docs, split
from engram_llama.cli import default_docs, default_model
from engram_llama.generate import AfterThinking, split_thinking
from engram_llama.runtime import EngramLlama
from research import synth

from test_cli import cli

TEMPLATES = {  # the 2B/0.8B file thinks only when asked; the 4B/9B/27B file unless told not to
    "2b": (ROOT / "tests/data/qwen35_chat_template.jinja").read_text(encoding="utf-8"),
    "4b": (ROOT / "tests/data/qwen35_4b_chat_template.jinja").read_text(encoding="utf-8"),
}
CLOSED, OPEN = "<|im_start|>assistant\n<think>\n\n</think>\n\n", "<|im_start|>assistant\n<think>\n"
CHUNKS = [Chunk(0, "a.md", "The delivery code for Indore is 4417."), Chunk(1, "b.md", "Bhopal's is 5120.")]


@pytest.fixture(scope="module")
def model():
    return str(synth.cached_model("qwen35-chat"))


@pytest.mark.parametrize("name", TEMPLATES)
def test_qwen35_templates_render_with_thinking_off_by_default(name):
    t = TEMPLATES[name]
    assert align.takes_thinking(t)
    off, spans, q = align.render(CHUNKS, [0, 1], "What is Indore's code?", t, "", "<|im_end|>")
    on, *_ = align.render(CHUNKS, [0, 1], "What is Indore's code?", t, "", "<|im_end|>", think=True)
    assert off.endswith("Question: What is Indore's code?<|im_end|>\n" + CLOSED)
    assert on.endswith("Question: What is Indore's code?<|im_end|>\n" + OPEN)
    assert off.startswith("<|im_start|>user\n" + align.INSTRUCTION)
    assert all(off[a:b] == c.text for c, (a, b) in zip(CHUNKS, (spans[0], spans[1])))
    # the template trims the message: a question with trailing blanks (or -i's empty one) still aligns
    assert align.render(CHUNKS, [0, 1], "What is Indore's code? \n", t, "", "<|im_end|>")[0] == off
    plain = align.render(CHUNKS, [0, 1], "q", None, "", "")[0]  # (no template: no switch)
    assert not align.takes_thinking(None) and "<think>" not in plain


def test_split_thinking_and_streaming_after_it():
    assert split_thinking("Let me see.\n\nIndore is listed.</think>\n\n4417") == ("Let me see.\n\nIndore is listed.", "4417")
    assert split_thinking("<think>\nhmm</think>4417") == ("hmm", "4417")
    assert split_thinking("still thinking when the budget ran out") == ("still thinking when the budget ran out", "")
    got = []
    s = AfterThinking(got.append)
    for piece in ["Let", " me\n\n", "see.</th", "ink>\n\n44", "17"]:
        s(piece)
    assert "".join(got) == "4417"
    # what streams is what the answer returns: up to its first blank line (runtime's cut), no
    # trailing whitespace; a stream that opens with whitespace after </think> drops it
    for pieces in (["<think>r</think>", "\n\nA b ", "\n", "\nB", "C"], ["<think>r</think>A", " b\n\nBC"]):
        got = []
        s = AfterThinking(got.append)
        for piece in pieces:
            s(piece)
        assert "".join(got) == split_thinking("".join(pieces))[1].split("\n\n")[0].strip() == "A b"


def test_prompt_on_the_generated_qwen35_aligns_exactly(model):
    chunks = split(read_docs(default_docs())[0])
    eng = EngramLlama(model, n_ctx=4096, n_threads=2)
    try:
        assert eng.cache.recurrent and align.takes_thinking(eng.template) and not eng.think
        prep = eng.prepare("What is the health cover under Ayushman Bharat?", chunks, 16)
        p = prep.prompt
        assert p.text.endswith(CLOSED)
        for cid in p.chunk_order:   # each chunk's token span decodes to text that holds the chunk
            a, b = p.chunk_tokens[cid]
            c = next(c for c in chunks if c.id == cid)
            assert c.text in eng.llm.detokenize(p.tokens[a:b])
            assert c.text not in eng.llm.detokenize(p.tokens[a + 1:b]) or c.text == ""
        assert eng.llm.detokenize(p.tokens[p.question_token:]).startswith("Question: What is the health cover")
    finally:
        eng.close()


def test_an_interrupted_answer_leaves_documents_a_follow_up_reuses_exactly(model):
    """Ctrl-C in the middle of an answer on the hybrid: the next question restores the documents'
    recurrent state and reads as a fresh run does (its logits bit for bit)."""
    chunks = split(read_docs(default_docs())[0])
    q1, q2 = "What is PM-KISAN?", "What is the health cover under Ayushman Bharat?"

    def stop_after(n):
        seen = []

        def on_token(t):
            seen.append(t)
            if len(seen) == n:
                raise KeyboardInterrupt
        return on_token

    def logits_of(eng, q):
        prep = eng.prepare(q, chunks, 16)
        p = eng.plan(prep, q)
        eng.hook.set_layers(p.layers, 1.0)
        eng.hook.set_bias(p.bias, seq_id=0, gate=p.gate)
        try:
            reused = eng.cache.prefill(prep.prompt.tokens, docs=prep.prompt.question_token)
            eng.llm.eval(prep.prompt.tokens[-1:])
            return reused, prep.prompt.question_token, eng.llm.logits()
        finally:
            eng.hook.clear()

    eng = EngramLlama(model, n_ctx=4096, n_threads=2)
    try:
        with pytest.raises(KeyboardInterrupt):
            eng.ask(q1, chunks, max_tokens=16, on_token=stop_after(3))
        gate1 = eng.prepare(q1, chunks, 16).prompt.question_token
        assert eng.llm.n_cached > gate1 + 10  # the cache holds documents, question and the cut-off answer
        reused, q0, got = logits_of(eng, q2)
        assert reused == q0 > 1000
    finally:
        eng.close()
    fresh = EngramLlama(model, n_ctx=4096, n_threads=2)
    try:
        assert np.array_equal(got, logits_of(fresh, q2)[2])
    finally:
        fresh.close()


def test_run_end_to_end_on_a_generated_qwen35_with_the_real_template(model):
    docs = default_docs()
    r = cli("run", model, "--chunks", docs, "What is PM-KISAN?", "--json", "-n", "8")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "thinking" not in out and "<think>" not in out["answer"]
    assert out["citations"][0]["source"] == "pm-kisan.md" and out["plan"]["layers"] == [3]
    # follow-ups on the hybrid: the documents' recurrent state restored, nothing of them decoded again
    r = cli("run", model, "--chunks", docs, "-i", "--json", "-n", "4",
            stdin="What is PM-KISAN?\nWhat is the health cover under Ayushman Bharat?\n")
    assert r.returncode == 0, r.stderr
    first, second = (json.loads(l) for l in r.stdout.splitlines())
    assert first["cache"]["reused_tokens"] == 0 and first["cache"]["checkpoint_bytes"] > 0
    assert second["cache"] == {"reused_tokens": second["plan"]["gate_token"], "how": "recurrent state restored",
                               "checkpoint_bytes": first["cache"]["checkpoint_bytes"]}
    r = cli("run", model, "--chunks", docs, "What is PM-KISAN?", "--json", "-n", "8", "--think")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # 8 tokens of a random model never close <think>: all of it is reasoning, the answer never came
    assert out["thinking"] and out["answer"] == ""


def test_think_on_a_template_without_the_switch_is_a_note():
    r = cli("run", default_model(), "--chunks", default_docs(), "What is PM-KISAN?", "-n", "1", "--think")
    assert r.returncode == 0, r.stderr
    assert "this model's chat template has no thinking switch; --think changes nothing" in r.stderr
