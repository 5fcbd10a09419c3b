"""Moving a chunk to the end of the cached documents without reading them again.

Small models read the passage next to the question and lose the ones far before it; reordering
the chunks fixes that but prefills the whole context per question. Here the best chunk's cached
cells get the positions of the documents' end instead (llama_memory_seq_add: llama.cpp re-rotates
their keys), those after it move up, and after the answer the documents' cells are restored from
a copy (cache.CacheManager.moved). The chunk's keys and values stay the ones computed where it was read, so this equals
reordering exactly only on the first layer (tests/test_move.py checks that on a one-layer
model); docs/EVAL.md measures the rest.
"""
from __future__ import annotations

from dataclasses import replace

from .align import Prompt, char_to_byte, token_span


def moved_span(prompt: Prompt, cid: int) -> tuple[int, int]:
    """What `move` shifts: chunk `cid` with its "Document [k] (source):" label and the blank line
    after it, up to the next chunk's label (or the question), so that the moved prompt reads as a
    reordered one: ...text of the last chunk, blank line, the moved chunk, blank line, question."""
    c2b = char_to_byte(prompt.text)

    def label(k: int) -> int:  # the k-th chunk's label (align.render numbers them from 1 in prompt order)
        c = prompt.chunk_order[k]
        at = prompt.text.rfind(f"Document [{k + 1}] (", 0, prompt.chunk_chars[c][0])
        if at < 0:
            raise ValueError(f"no label found before chunk {c}")
        return token_span(prompt.offsets, prompt.n_prefix, c2b[at], c2b[at] + 1)[0]

    k = prompt.chunk_order.index(cid)
    end = label(k + 1) if k + 1 < len(prompt.chunk_order) else prompt.question_token
    return label(k), end


def moved_prompt(prompt: Prompt, a: int, b: int) -> Prompt:
    """The prompt's chunk spans once the tokens [a, b) sit at the end of the documents, those after
    them moved up by b - a: the positions the cache holds after shift_to_end(..., a, b, q0), and
    the tokens in that order (the text, char spans and offsets stay the original's)."""
    q0, n = prompt.question_token, b - a

    def at(x: int) -> int:
        return x + (q0 - b) if a <= x < b else x - n if b <= x < q0 else x

    spans = {cid: (at(x), at(y - 1) + 1) for cid, (x, y) in prompt.chunk_tokens.items()}
    return replace(prompt, chunk_tokens=spans, tokens=moved_tokens(prompt.tokens, a, b, q0))


def shift_to_end(lc, mem, a: int, b: int, q0: int, back: bool = False, seq: int = 0) -> None:
    """Positions [a, b) to the end of the documents, [q0 - (b - a), q0), and [b, q0) up to [a, ..)
    (back: the reverse): three position shifts of the cached cells, through a range past q0 where
    nothing is cached, so that no two ranges meet. llama.cpp re-rotates the keys (RoPE) at the next
    decode; the values stay the ones computed where the chunk was read."""
    add, n = lc.llama_memory_seq_add, b - a
    if not back:
        add(mem, seq, a, b, q0 + n - a)             # [a, b) -> [q0 + n, q0 + 2n)
        add(mem, seq, b, q0, -n)                    # [b, q0) -> [a, q0 - n)
        add(mem, seq, q0 + n, q0 + 2 * n, -2 * n)   # -> [q0 - n, q0)
    else:
        add(mem, seq, q0 - n, q0, 2 * n)            # [q0 - n, q0) -> [q0 + n, q0 + 2n)
        add(mem, seq, a, q0 - n, n)                 # [a, q0 - n) -> [b, q0)
        add(mem, seq, q0 + n, q0 + 2 * n, a - q0 - n)  # -> [a, b)


def reread_to_end(lc, mem, decode, tokens: list[int], a: int, b: int, q0: int, seq: int = 0) -> None:
    """Like shift_to_end, but the chunk's cells are computed again at the documents' end (decode(ids,
    pos0) reads them after every other chunk, b - a tokens), not kept from where it was read: the
    chunk as reordering would read it; the other chunks' cells stay as they are."""
    n = b - a
    shift_to_end(lc, mem, a, b, q0, seq=seq)
    lc.llama_memory_seq_rm(mem, seq, q0 - n, q0)
    decode(tokens[a:b], q0 - n)


REREAD = ("never", "first", "always")


def check_reread(mode: str) -> None:
    if mode not in REREAD:
        raise ValueError(f"reread must be one of {', '.join(REREAD)}, not {mode!r}")


def rereads(mode: str, prompt: Prompt, cid: int) -> bool:
    """Whether moving chunk `cid` reads it again (reread_to_end) rather than shifting its cells.
    "first": only the documents' first chunk, whose cells were computed with no other chunk before
    them; read again it answered where its shifted cells did not, while a chunk from further in
    lost by it (docs/ABLATIONS.md, "Reading the moved chunk again (`--reread first`: not the
    default)")."""
    check_reread(mode)
    return mode == "always" or (mode == "first" and prompt.chunk_order.index(cid) == 0)


def moved_tokens(tokens: list[int], a: int, b: int, q0: int) -> list[int]:
    """The token order the cache holds after shift_to_end (what a prefix match must compare with)."""
    return tokens[:a] + tokens[b:q0] + tokens[a:b] + tokens[q0:]
