"""Where an answer ends: a whitespace stop ("\\n" after a plain prompt, "\\n\\n" after a chat turn)
counts only once the answer has begun. Checked with scripted pieces, and on Gemma-3-270M, which
opens its answer to this NQ question with a newline (llama-cpp-python's own stream, no stop, is
the reference)."""
import pytest

from conftest import gemma3_path
from engram_llama.chunks import Chunk
from engram_llama.generate import generate


class Scripted:
    """An adapter stand-in: yields the given pieces, records the stops it was asked for."""

    def __init__(self, pieces):
        self.pieces, self.stop, self.closed, self.finish_reason = pieces, None, False, None

    def complete(self, tokens, max_tokens, temperature, stop):
        self.stop = stop
        try:
            yield from self.pieces
            self.finish_reason = "length"
        finally:
            self.closed = True


@pytest.mark.parametrize("pieces,stop,want,streamed,finish", [
    # a newline before the answer is no answer's end; the one after it is
    (["\n", "Keeley", " Hawes", "\n", "Answer:"], ["\n\n", "<eos>", "\n"], "Keeley Hawes", ["Keeley", " Hawes"], "stop"),
    (["  Ben Willis\nQuestion: what"], ["\n"], "Ben Willis", ["Ben Willis"], "stop"),
    (["\n\n", "\n", "4417", " is", "\n", "the code", "\n", "\n", "More"], ["\n\n"], "4417 is\nthe code",
     ["4417", " is", "\nthe code"], "stop"),
    (["\n", "\n"], ["\n"], "", [], "length"),                      # nothing but whitespace: no answer
    (["42", "  "], ["\n"], "42", ["42"], "length"),                # trailing blanks at the budget's end
])
def test_a_whitespace_stop_ends_only_a_begun_answer(pieces, stop, want, streamed, finish):
    llm, got = Scripted(pieces), []
    assert "".join(generate(llm, [1], 16, 0.0, stop, got.append)) == want
    assert got == streamed
    assert llm.stop == [s for s in stop if s.strip()] and llm.closed   # the stream is closed when cut
    assert llm.finish_reason == finish


def test_other_stops_stream_as_before():
    llm, got = Scripted(["<think>", "\n\n", "4417"]), []
    assert "".join(generate(llm, [1], 16, 0.0, ["<|im_end|>"], got.append)) == "<think>\n\n4417"
    assert got == ["<think>", "\n\n", "4417"] and llm.stop == ["<|im_end|>"]


@pytest.mark.skipif(gemma3_path() is None, reason="Gemma-3-270M not installed (scripts/setup.sh)")
def test_gemma_answers_after_its_opening_newline():
    from engram_llama.runtime import EngramLlama, Settings

    gold = Chunk(0, "Keeley Hawes", "Keeley Clare Julia Hawes (born 10 February 1976) is an English actress.  She "
                 "starred in the film version of The Last September (1999) and has voiced roles in video games, such as "
                 "Lara Croft in several of the Tomb Raider games. She is also known for her roles as Kitty Butler in "
                 "Tipping the Velvet, Zoe Reynolds in Spooks (2002–2004), Alex Drake in Ashes to Ashes (2008–2010), "
                 "Lady Agnes in the 2010 reboot of Upstairs, Downstairs, Detective Inspector Lindsay Denton in the "
                 "second and third series of Line of Duty (2014–2016), as a mother in search of her abducted child")
    eng = EngramLlama(str(gemma3_path()), n_ctx=1024, n_threads=2, chat=False)
    try:
        a = eng.ask("who plays lindsay denton in line of duty", [gold], max_tokens=16, settings=Settings(engram=False))
        raw = "".join(eng.llm.complete(eng.prepare("who plays lindsay denton in line of duty", [gold], 16, None,
                                                   Settings(engram=False), None).prompt.tokens, 16, 0.0, []))
    finally:
        eng.close()
    assert raw.startswith("\n")                    # llama-cpp-python's stop at "\n" would answer ""
    assert a.text == raw.strip().split("\n")[0] == "Keeley Hawes"
    assert a.finish_reason == "stop"
