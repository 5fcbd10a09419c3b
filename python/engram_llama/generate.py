"""The answer: greedy (or sampled) tokens after the prompt, streamed, up to a stop."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def stops(llm, chat: bool, think: bool = False) -> list[str]:
    """A blank line ends an answer; a chat turn's end marker, or a plain prompt's newline. While
    a model thinks, blank lines are part of its reasoning: only the turn's end stops it."""
    return ([] if think else ["\n\n"]) + ([llm.eos] if llm.eos else []) + (
        ["<|im_end|>", "<end_of_turn>"] if chat else ["\n"])


def split_thinking(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a thinking model's output: the prompt opened <think> (or the model
    did), and the answer is what follows </think>; without </think> the answer was never reached."""
    head, sep, tail = text.partition(THINK_CLOSE)
    if not sep:
        return text.replace(THINK_OPEN, "", 1).strip(), ""
    return head.replace(THINK_OPEN, "", 1).strip(), tail.strip()


class AfterThinking:
    """Streams only the answer of a thinking model: what follows </think>, up to the blank line
    where the returned answer ends (runtime cuts it there), trailing whitespace held back."""

    def __init__(self, on_token: Callable[[str], None] | None):
        self.on_token, self.buf, self.open = on_token, "", True
        self.answer, self.sent, self.done = "", 0, False

    def __call__(self, piece: str) -> None:
        if self.open:
            self.buf += piece
            _, sep, piece = self.buf.partition(THINK_CLOSE)
            if not sep:
                return
            self.open = False
        if self.done:
            return
        self.answer = (self.answer + piece) if self.answer else piece.lstrip()
        end = self.answer.find("\n\n")
        upto = len((self.answer if end < 0 else self.answer[:end]).rstrip())
        if upto > self.sent and self.on_token:
            self.on_token(self.answer[self.sent:upto])
        self.sent = max(self.sent, upto)
        self.done = end >= 0


def generate(llm, tokens: Sequence[int], max_tokens: int, temperature: float, stop: list[str],
             on_token: Callable[[str], None] | None = None,
             before_sample: Callable[[int], None] | None = None) -> Iterator[str]:
    """The answer's pieces up to a stop. A stop made of whitespace ("\n", "\n\n") ends the answer
    only once it has begun: a base model that opens with a newline after "Answer:" (Gemma 3 does,
    on about a tenth of NQ questions) would otherwise answer nothing. Leading whitespace is dropped;
    trailing whitespace waits for the next piece, which shows whether it began a stop."""
    blank = [s for s in stop if s and not s.strip()]
    kept = [s for s in stop if s not in blank]
    pieces = (llm.complete(tokens, max_tokens, temperature, kept, before_sample=before_sample) if before_sample
              else llm.complete(tokens, max_tokens, temperature, kept))
    if not blank:
        for piece in pieces:
            if on_token:
                on_token(piece)
            yield piece
        return
    text, sent = "", 0  # all that was generated; how much of it went out
    try:
        for piece in pieces:
            text += piece
            body = len(text) - len(text.lstrip())  # where the answer begins
            if body == len(text):
                continue
            sent = max(sent, body)
            ends = [e for e in (text.find(s, body) for s in blank) if e >= 0]
            upto = min(ends) if ends else len(text.rstrip())
            if upto > sent:
                if on_token:
                    on_token(text[sent:upto])
                yield text[sent:upto]
                sent = upto
            if ends:
                llm.finish_reason = "stop"
                return
    finally:
        close = getattr(pieces, "close", None)
        if close:
            close()
