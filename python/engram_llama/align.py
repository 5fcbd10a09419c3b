"""The final prompt and the exact token positions of every chunk in it.

The prompt is rendered with the model's chat template (chunks labelled, question last); its
tokens' byte spans come from concatenating their pieces, which must reproduce the prompt's bytes
exactly, so a character span maps to the tokens whose bytes overlap it (a token that straddles a
chunk boundary belongs to both).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from .chunks import Chunk

INSTRUCTION = ("Answer the question using only the documents below. "
               "Reply with a short answer.")
# a plain prompt (no chat template, base models) ends here, so the next tokens are the answer
ANSWER_PREFIX = "Answer:"


class AlignmentError(Exception):
    pass


@dataclass
class Prompt:
    text: str
    tokens: list[int]
    chunk_order: list[int]                      # chunk ids in prompt order
    chunk_chars: dict[int, tuple[int, int]]     # chunk id -> char span of its text in the prompt
    chunk_tokens: dict[int, tuple[int, int]]    # chunk id -> token span [a, b)
    question_token: int                         # first token of the question (the gate)
    offsets: list[int]                          # byte offset of each token's start (+ total at end)
    n_prefix: int                               # tokens added before the text (BOS)


def takes_thinking(template: str | None) -> bool:
    """The chat template has a thinking switch (Qwen3, Qwen3.5: `enable_thinking`)."""
    return bool(template) and "enable_thinking" in template


def _label(k: int, c: Chunk) -> str:
    return f"Document [{k}] ({c.source}):\n"


def _chat(template: str, bos: str, eos: str, think: bool):
    """The chat template as a function of the messages (a switch for thinking set as render says)."""
    from . import llama_cpp  # noqa: F401  (the patched libllama before llama_cpp's modules)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
    extra = {"enable_thinking": bool(think)} if takes_thinking(template) else {}
    return lambda messages: fmt(messages=messages, **extra).prompt


def render(chunks: list[Chunk], order: list[int], question: str, template: str | None,
           bos: str = "", eos: str = "", answer_prefix: str | None = None,
           think: bool = False, history: list[dict] | None = None) -> tuple[str, dict[int, tuple[int, int]], int]:
    """Prompt text, char span of each chunk's text, char offset of the question. answer_prefix
    starts the answer: on its own line of a plain prompt (default ANSWER_PREFIX), after a chat
    template's turn (default none). A base model continues a prefix it can complete (KV
    retrieval: the record's key, as Liu et al.'s prompt ends) better than a bare "Answer:".
    think: a template with a thinking switch renders with it on (default off: Qwen3.5 thinks
    unless told not to, and a short answer budget would be spent inside <think>). history: earlier
    chat turns ({"role", "content"}) before the message that carries the documents and question."""
    question = question.strip()  # templates trim the message (Qwen3.5): the text must survive that
    by_id = {c.id: c for c in chunks}
    parts, spans, pos = [], {}, 0
    head = INSTRUCTION + "\n\n"
    parts.append(head)
    pos += len(head)
    for k, cid in enumerate(order, 1):
        c = by_id[cid]
        label = _label(k, c)
        parts.append(label)
        pos += len(label)
        spans[cid] = (pos, pos + len(c.text))
        parts.append(c.text + "\n\n")
        pos += len(c.text) + 2
    q_off = pos
    parts.append(f"Question: {question}")
    content = "".join(parts)
    if template:
        text = _chat(template, bos, eos, think)(list(history or []) + [{"role": "user", "content": content}])
        at = text.rfind(content)
        if at < 0:
            raise AlignmentError("the chat template changed the message text; cannot locate the chunks")
        text += answer_prefix or ""
    else:
        past = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in history or [])
        text = past + content + "\n" + (ANSWER_PREFIX if answer_prefix is None else answer_prefix)
        at = len(past)
    return text, {cid: (a + at, b + at) for cid, (a, b) in spans.items()}, q_off + at


def history_spans(text: str, history: list[dict] | None, template: str | None, bos: str = "",
                  eos: str = "", think: bool = False) -> list[tuple[int, int]]:
    """The char spans of the earlier turns' contents in a prompt render() made of the same
    arguments, so a control token's string in them is only text, as in the user's own message (an
    OpenAI-style message's content is text). Found by rendering each content as a unique marker,
    never by searching for it, and kept only where the render with the contents in place opens the
    prompt exactly; where the template changes a content beyond trimming it (Qwen3.5 drops an earlier
    answer's reasoning) none are returned: that history is parsed as llama.cpp parses it."""
    if not history or not all(isinstance(m.get("content"), str) for m in history):
        return []
    if not template:
        out, pos = [], 0
        for m in history:
            pos += len(m["role"].capitalize()) + 2
            out.append((pos, pos + len(m["content"])))
            pos += len(m["content"]) + 2
        return out
    mark = "\ue000{}\ue001".format  # (private-use characters, which no template writes)
    try:
        marked = _chat(template, bos, eos, think)([{**m, "content": mark(k)} for k, m in enumerate(history)]
                                                  + [{"role": "user", "content": mark(len(history))}])
    except Exception:  # (a template raises as it likes; render() has rendered the real turns)
        return []
    pieces = marked.split(mark(len(history)))[0]
    between = []  # the template's text before each turn, and after the last
    for k in range(len(history)):
        cut = pieces.split(mark(k))
        if len(cut) != 2:
            return []
        between.append(cut[0])
        pieces = cut[1]
    between.append(pieces)
    if not text.startswith(between[0]):
        return []
    out, pos = [], len(between[0])
    for m, after in zip(history, between[1:]):
        # the content as given, or trimmed (Qwen3.5 trims every turn, Gemma 3 all but the system's)
        shown = next((c for c in (m["content"], m["content"].strip()) if text.startswith(c + after, pos)), None)
        if shown is None:
            return []
        out.append((pos, pos + len(shown)))
        pos += len(shown) + len(after)
    return out


def user_span(chunks: list[Chunk], order: list[int], q_char: int, question: str) -> tuple[int, int]:
    """The char span of the user's text in a prompt render() made of the same arguments (the
    documents, their labels, the question), where a control token's string is only text
    (lowlevel.tokenize_plain); counted back from the question by render's own layout, never
    searched for, so no document can move it."""
    by_id = {c.id: c for c in chunks}
    n = sum(len(_label(k, by_id[cid])) + len(by_id[cid].text) + 2 for k, cid in enumerate(order, 1))
    return q_char - n, q_char + len("Question: ") + len(question.strip())


def byte_offsets(text: str, pieces: list[bytes], n_prefix: int) -> list[int]:
    """Start byte of every token within text's UTF-8 (prefix tokens at 0), plus the total length."""
    data = text.encode("utf-8")
    joined = b"".join(pieces[n_prefix:])
    if joined != data:
        # locate the first divergence for the message
        i = next((k for k in range(min(len(joined), len(data))) if joined[k] != data[k]), min(len(joined), len(data)))
        raise AlignmentError(f"the tokenizer's pieces do not reproduce the prompt (byte {i} of {len(data)})")
    offs = [0] * n_prefix
    pos = 0
    for p in pieces[n_prefix:]:
        offs.append(pos)
        pos += len(p)
    offs.append(pos)
    return offs


def char_to_byte(text: str) -> list[int]:
    """Byte offset of every character boundary (len(text) + 1 entries)."""
    out = [0]
    for ch in text:
        out.append(out[-1] + len(ch.encode("utf-8")))
    return out


def token_span(offsets: list[int], n_prefix: int, b0: int, b1: int) -> tuple[int, int]:
    """Tokens [a, b) whose bytes overlap [b0, b1)."""
    starts = offsets[:-1]
    # last token starting at or before b0, first token starting at or after b1
    a = max(n_prefix, bisect.bisect_right(starts, b0, lo=n_prefix) - 1)
    b = bisect.bisect_left(starts, b1, lo=n_prefix)
    return a, b


def answer_token(prompt: Prompt, question: str) -> int:
    """The first token after the question's text (the template's tail, the answer prefix): where
    the queries that choose the answer begin."""
    question = question.strip()
    at = prompt.text.rfind(f"Question: {question}")
    if at < 0:
        raise AlignmentError("the question's text is not in the prompt")
    return token_span(prompt.offsets, prompt.n_prefix, 0, char_to_byte(prompt.text)[at + len("Question: ") + len(question)])[1]


def align(text: str, tokens: list[int], pieces: list[bytes], n_prefix: int,
          spans: dict[int, tuple[int, int]], q_char: int, order: list[int]) -> Prompt:
    offs = byte_offsets(text, pieces, n_prefix)
    c2b = char_to_byte(text)
    chunk_tokens = {cid: token_span(offs, n_prefix, c2b[a], c2b[b]) for cid, (a, b) in spans.items()}
    qa, _ = token_span(offs, n_prefix, c2b[q_char], c2b[q_char] + 1)
    return Prompt(text, tokens, order, spans, chunk_tokens, qa, offs, n_prefix)
