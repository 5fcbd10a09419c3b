"""Where each entity of the question occurs in each chunk (character spans)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .chunks import Chunk
from .extract import Entity, normalize


@dataclass
class PointerMap:
    question_entities: list[Entity]
    # chunk id -> entity key -> list of (start, end) character spans in the chunk text
    hits: dict[int, dict[str, list[tuple[int, int]]]] = field(default_factory=dict)
    # entities of each chunk, kept for explanation even when the question does not mention them
    chunk_entities: dict[int, list[Entity]] = field(default_factory=dict)
    # inverse document frequency of each question entity over the chunks
    idf: dict[str, float] = field(default_factory=dict)

    def entity_score(self, chunk_id: int) -> float:
        """Salience-weighted overlap: the idf of every question entity the chunk contains."""
        return sum(self.idf[k] for k in self.hits.get(chunk_id, {}))


def build(question_entities: list[Entity], chunks: list[Chunk], chunk_entities: list[list[Entity]],
          table=None) -> PointerMap:
    """Occurrences of the question's entities in the chunks.

    Table-linked entities are found through the chunks' own table matches, so any alias counts
    ("PM-KISAN" in the question finds "Kisan Samman Nidhi" in a chunk); the others by exact,
    whole-word, case-insensitive text. The weight of an entity is its inverse document frequency
    over the chunks times its table salience prior (1 when not in the table).
    """
    import ahocorasick

    keys: dict[str, Entity] = {}
    for e in question_entities:
        if e.ent >= 0 or len(e.key) >= 2:
            keys.setdefault(e.key, e)
    pm = PointerMap(question_entities=list(keys.values()),
                    chunk_entities={c.id: ents for c, ents in zip(chunks, chunk_entities)})
    if not keys:
        return pm
    text_keys = [k for k, e in keys.items() if e.ent < 0]
    auto = None
    if text_keys:
        auto = ahocorasick.Automaton()
        for k in text_keys:
            auto.add_word(k, k)
        auto.make_automaton()
    df = {k: 0 for k in keys}
    for c, ents in zip(chunks, chunk_entities):
        found: dict[str, list[tuple[int, int]]] = {}
        for e in ents:
            if e.ent >= 0 and e.key in keys:
                found.setdefault(e.key, []).append((e.start, e.end))
        if auto is not None:
            low = c.text.lower()
            if len(low) != len(c.text):  # rare case folding that changes length
                low = "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in c.text)
            for end, k in auto.iter(low):
                start = end - len(k) + 1
                if (start > 0 and low[start - 1].isalnum()) or (end + 1 < len(low) and low[end + 1].isalnum()):
                    continue
                found.setdefault(k, []).append((start, end + 1))
        if found:
            pm.hits[c.id] = found
            for k in found:
                df[k] += 1
    n = max(len(chunks), 1)
    for k, e in keys.items():
        prior = table.salience(e.ent) if (table is not None and e.ent >= 0) else 1.0
        pm.idf[k] = prior * math.log(1.0 + (n - df[k] + 0.5) / (df[k] + 0.5))
    return pm
