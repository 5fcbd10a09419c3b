"""The additive bias over token positions: strength × relevance on the chosen spans."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .align import Prompt, char_to_byte, token_span
from .pointer_map import PointerMap
from .relevance import Scored

GRANULARITIES = ("chunk", "sentence", "entity", "body", "novel", "focus")
REST = 0.5  # focus: the rest of the chunk at this share of its best sentences' strength (policy.REST)
ECHO_RUN = 6  # novel: a run of this many tokens that the question (or answer prefix) repeats is an echo

_STOP = set("the a an of in on at to for and or is are was were be been by with from as that this what which who "
            "whom when where why how does do did has have had it its into per under each".split())


# a word: letters and digits with the combining marks of Indic scripts (re's \w leaves out the vowel
# signs, cutting "किसान" into pieces)
_WORD = re.compile(r"[\w\u0900-\u0963\u0966-\u0dff]+")  # (not the dandas, U+0964-5)


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in _STOP}


def sentences(text: str, lines: bool = False) -> list[tuple[int, int]]:
    """Character spans of the sentences of text (ends at . ! ? । or a blank line; lines: at every
    line break too, so that records one per line are units of their own)."""
    spans, start = [], 0
    for m in re.finditer(r"[.!?।]+(?=\s)|\n" if lines else r"[.!?।]+(?=\s)|\n\s*\n", text):
        end = m.end()
        if text[start:end].strip():
            spans.append((start, end))
        start = end
    if text[start:].strip():
        spans.append((start, len(text)))
    return spans


@dataclass
class BiasSpan:
    chunk_id: int
    tokens: tuple[int, int]
    value: float
    what: str  # "chunk" or the entity text


RAMP = 0.25  # fraction of the prompt before the question over which `near` rises to `strength`
MIDDLE = 0.5  # with `mid`: the fraction of the prompt before the question where the fall to `strength` begins


def chunk_strength(prompt: Prompt, chunk_id: int, strength: float, near: float | None,
                   far: float | None = None, mid: float | None = None) -> float:
    """The strength for one chunk: `strength`, or, with `near`, less for chunks close to the
    question, which small models already read (recency): `near` for a chunk that ends at the
    question, rising linearly to `strength` over the RAMP fraction of the prompt before it.
    With `mid`, the ramp rises to `mid` instead, holds it to the MIDDLE of the prompt and falls
    back linearly to `strength` at the first token: the chunks in the middle are the ones read
    least, those at the start are read too (primacy). With `far` (an evaluation probe), beyond
    the ramp it goes on linearly from `strength` to `far` at the prompt's first token."""
    q0 = max(prompt.question_token, 1)
    dist = max(0, q0 - prompt.chunk_tokens[chunk_id][1]) / q0
    fall = RAMP
    if mid:
        strength, far, fall = mid, strength, MIDDLE
    if far is not None and dist > fall:
        return strength + (far - strength) * (dist - fall) / (1.0 - fall)
    if near is None:
        return strength
    return near + (strength - near) * min(1.0, dist / RAMP)


def echoes(prompt: Prompt, a: int, b: int, n: int = ECHO_RUN) -> np.ndarray:
    """Which tokens of [a, b) lie in a run of n or more tokens that also stands after the
    question's first token (the question, the answer prefix): by token ids, so a key, a name or
    a phrase the question quotes, not a shared word."""
    return echo_mask(prompt.tokens[a:b], prompt.tokens[prompt.question_token:], n)


def echo_mask(toks: list[int], tail: list[int], n: int = ECHO_RUN) -> np.ndarray:
    """`echoes` on bare token lists (research/echo_runs.py counts chunks tokenized on their own)."""
    grams = {tuple(tail[i:i + n]) for i in range(len(tail) - n + 1)}
    out = np.zeros(len(toks), dtype=bool)
    for i in range(len(toks) - n + 1):
        if tuple(toks[i:i + n]) in grams:
            out[i:i + n] = True
    return out


def best_sentences(text: str, question: str, pm: PointerMap | None, cid: int,
                   lines: bool = False) -> list[tuple[int, int]] | None:
    """The sentences of a chunk that share the most content words or entities with the question
    (those within half of the best score), as character spans; None when none shares any."""
    qw = _words(question)
    hits = [x for v in (pm.hits.get(cid, {}) if pm else {}).values() for x in v]
    sents = sentences(text, lines)
    score = [len(qw & _words(text[x:y])) + 2 * sum(1 for h in hits if x <= h[0] < y) for x, y in sents]
    best = max(score, default=0)
    return [sp for sp, sc in zip(sents, score) if sc >= max(1, best / 2)] if best > 0 else None


def others(prompt: Prompt, bias: np.ndarray, keep: list[int], value: float) -> np.ndarray:
    """`value` over every chunk not in `keep` (an evaluation probe): a negative value pushes the
    distractors down, which leaves the kept chunk where it was against the tokens outside the
    chunks (the question, the answer so far, the first tokens) instead of lifting it over them."""
    out = bias.copy()
    for cid, (a, b) in prompt.chunk_tokens.items():
        if cid not in keep:
            out[a:b] = value
    return out


def build(prompt: Prompt, selected: list[tuple[Scored, float]], strength: float,
          granularity: str = "chunk", pm: PointerMap | None = None, question: str = "",
          near: float | None = None, far: float | None = None,
          mid: float | None = None, echo_run: int = ECHO_RUN) -> tuple[np.ndarray, list[BiasSpan]]:
    """One float per prompt token (0 outside the biased spans) and the spans, for --explain.

    chunk: the whole chunk; sentence: the chunk's sentences that share the most content words
    or entities with the question (the whole chunk when none does); entity: only the
    question's entities where they occur in the chunk; body: the chunk after its first sentence
    (an evaluation probe: biased whole, small models recite a passage from its opening);
    novel: the chunk less its echoes of the question (`echoes`): a lifted echo is what a small
    model copies back (a KV record's key, the question restated) instead of what follows it.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    bias = np.zeros(len(prompt.tokens), dtype=np.float32)
    spans: list[BiasSpan] = []
    c2b = None
    for s, weight in selected:
        cid = s.chunk.id
        value = chunk_strength(prompt, cid, strength, near, far, mid) * weight
        if granularity == "chunk":
            a, b = prompt.chunk_tokens[cid]
            spans.append(BiasSpan(cid, (a, b), value, "chunk"))
        elif granularity == "body":
            sents = sentences(s.chunk.text)
            if len(sents) < 2:
                spans.append(BiasSpan(cid, prompt.chunk_tokens[cid], value, "chunk"))
            else:
                c2b = c2b or char_to_byte(prompt.text)
                base = prompt.chunk_chars[cid][0]
                a, b = token_span(prompt.offsets, prompt.n_prefix, c2b[base + sents[1][0]], c2b[base + len(s.chunk.text)])
                spans.append(BiasSpan(cid, (a, b), value, "body"))
        elif granularity == "novel":
            a, b = prompt.chunk_tokens[cid]
            keep = ~echoes(prompt, a, b, echo_run)
            if keep.all():
                spans.append(BiasSpan(cid, (a, b), value, "chunk"))
            else:  # the runs between the echoes: +1 where one starts, -1 where it ends
                edges = np.flatnonzero(np.diff(np.concatenate(([0], keep.astype(np.int8), [0]))))
                spans.extend(BiasSpan(cid, (a + int(x), a + int(y)), value, "novel")
                             for x, y in zip(edges[::2], edges[1::2]))
        elif granularity == "focus":
            c2b = c2b or char_to_byte(prompt.text)
            base = prompt.chunk_chars[cid][0]
            a, b = prompt.chunk_tokens[cid]
            best = np.zeros(b - a, dtype=bool)
            for x, y in best_sentences(s.chunk.text, question, pm, cid, lines=True) or []:
                ta, tb = token_span(prompt.offsets, prompt.n_prefix, c2b[base + x], c2b[base + y])
                best[max(ta, a) - a:max(min(tb, b), a) - a] = True
            kind = np.where(best, 2, 1)          # 2: a best sentence, 1: the rest, 0: an echo
            kind[echoes(prompt, a, b, echo_run)] = 0
            cuts = np.flatnonzero(np.diff(kind)) + 1
            for x, y in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [b - a]))):
                if kind[x]:
                    spans.append(BiasSpan(cid, (a + int(x), a + int(y)), value if kind[x] == 2 else value * REST,
                                          "sentence" if kind[x] == 2 else "rest"))
        elif granularity == "sentence":
            c2b = c2b or char_to_byte(prompt.text)
            base = prompt.chunk_chars[cid][0]
            chosen = best_sentences(s.chunk.text, question, pm, cid) or [(0, len(s.chunk.text))]
            for x, y in chosen:
                a, b = token_span(prompt.offsets, prompt.n_prefix, c2b[base + x], c2b[base + y])
                spans.append(BiasSpan(cid, (a, b), value, "sentence" if (x, y) != (0, len(s.chunk.text)) else "chunk"))
        else:
            if pm is None:
                raise ValueError("entity granularity needs the pointer map")
            c2b = c2b or char_to_byte(prompt.text)
            base = prompt.chunk_chars[cid][0]
            for key, hits in pm.hits.get(cid, {}).items():
                for (x, y) in hits:
                    a, b = token_span(prompt.offsets, prompt.n_prefix, c2b[base + x], c2b[base + y])
                    spans.append(BiasSpan(cid, (a, b), value, key))
    for sp in spans:
        a, b = sp.tokens
        bias[a:b] = np.maximum(bias[a:b], sp.value)
    return bias, spans
