"""The answer: greedy (or sampled) tokens after the prompt, streamed, up to a stop."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence


def stops(llm, chat: bool) -> list[str]:
    """A blank line ends an answer; a chat turn's end marker, or a plain prompt's newline."""
    return ["\n\n"] + ([llm.eos] if llm.eos else []) + (["<|im_end|>", "<end_of_turn>"] if chat else ["\n"])


def generate(llm, tokens: Sequence[int], max_tokens: int, temperature: float, stop: list[str],
             on_token: Callable[[str], None] | None = None) -> Iterator[str]:
    for piece in llm.complete(tokens, max_tokens, temperature, stop):
        if on_token:
            on_token(piece)
        yield piece
