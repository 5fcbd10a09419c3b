"""The additive bias over token positions: strength × relevance on the chosen spans."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .align import Prompt, char_to_byte, token_span
from .pointer_map import PointerMap
from .relevance import Scored

GRANULARITIES = ("chunk", "entity")


@dataclass
class BiasSpan:
    chunk_id: int
    tokens: tuple[int, int]
    value: float
    what: str  # "chunk" or the entity text


def build(prompt: Prompt, selected: list[tuple[Scored, float]], strength: float,
          granularity: str = "chunk", pm: PointerMap | None = None) -> tuple[np.ndarray, list[BiasSpan]]:
    """One float per prompt token (0 outside the biased spans) and the spans, for --explain."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    bias = np.zeros(len(prompt.tokens), dtype=np.float32)
    spans: list[BiasSpan] = []
    c2b = None
    for s, weight in selected:
        cid = s.chunk.id
        value = strength * weight
        if granularity == "chunk":
            a, b = prompt.chunk_tokens[cid]
            spans.append(BiasSpan(cid, (a, b), value, "chunk"))
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
