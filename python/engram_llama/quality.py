"""Scoring one answer for calibration: correct, degenerate or wrong.

A steering bias that is too strong rarely makes a model say something plausible and false; it makes
it loop, stutter or recite the chunk it was pushed to. Those are counted apart ("degenerate"), and
they win over "correct": a loop that happens to contain the answer is still a broken model.
"""
from __future__ import annotations

import re
import string
from typing import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LOOP_MAX_N, _REPEATS, _RECITAL_WORDS = 6, 3, 8
# a unit of 2-8 characters (lazy: the shortest) repeated back to back, 3 times or more
_STUTTER = re.compile(r"(.{2,8}?)\1{2,}", re.S)
_NUMBER_FORMAT = re.compile(r"[\d.,]+")
# digits repeated for this many characters are no number anyone writes: a value run into zeros
_DIGIT_RUN = 16


def normalize(s: str) -> str:
    """Lost-in-the-Middle answer normalisation (research/datasets.py's: lower case, no punctuation,
    no articles, single spaces), except that a '.' or ',' between two digits stays, so "412.7" and
    "1,000,000" keep their shape instead of merging into other numbers."""
    s = s.lower()
    s = "".join(ch for i, ch in enumerate(s)
                if ch not in _PUNCT
                or (ch in ".," and 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit()))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _words(s: str) -> list[str]:
    """Whitespace words, lower case, without surrounding punctuation ("the, the, the." loops too)."""
    return [w for w in (t.strip(string.punctuation) for t in s.lower().split()) if w]


def _loop(words: list[str]) -> bool:
    for n in range(1, _LOOP_MAX_N + 1):
        for i in range(len(words) - n * _REPEATS + 1):
            gram = words[i:i + n]
            if all(words[i + r * n:i + (r + 1) * n] == gram for r in range(1, _REPEATS)):
                return True
    return False


def _stutter(answer: str, gold_answers: list[str]) -> bool:
    """A repeated unit with a letter or digit in it, that is not number formatting ("1,000,000,000",
    "1,00,00,000") and not inside a gold answer's own text (a UUID may repeat "ab" three times).
    One digit repeated for _DIGIT_RUN characters or more ("13345800000000000000...") is a stutter."""
    low = answer.lower()
    inside = [(m.start(), m.end()) for a in gold_answers if a
              for m in re.finditer(re.escape(a.lower()), low)]
    for m in _STUTTER.finditer(low):
        unit = m.group(1)
        if not any(ch.isalnum() for ch in unit):
            continue
        one_digit_run = unit.isdigit() and len(set(unit)) == 1 and m.end() - m.start() >= _DIGIT_RUN
        if _NUMBER_FORMAT.fullmatch(unit) and not one_digit_run:
            continue
        if any(s <= m.start() and m.end() <= e for s, e in inside):
            continue
        return True
    return False


def _holds(text: str, answer: str) -> bool:
    """The normalised answer in the normalised text as whole words: not inside a longer word or
    number ("10" in "100"), but next to a symbol ("6,000" in "₹6,000")."""
    return bool(answer) and re.search(rf"(?<![^\W_]){re.escape(answer)}(?![^\W_])", text) is not None


def _recital(answer: str, documents: str, gold_answers: list[str], question: str = "") -> bool:
    """A run of >= 8 consecutive (normalised) words copied from the documents that holds no gold
    answer: the chunk read out instead of answered. A copied run that holds the answer is fine, and
    so is restating the question (its words are no recital even where a chunk has them too). The
    run alone is judged: an answer given in the model's words and then continued by 8+ copied words
    of its sentence that do not hold it is a recital too (a stricter rule than "the answering
    sentence is fine"; the sealed split was judged so)."""
    golds = [g for g in (normalize(x) for x in gold_answers) if g]
    return any(not any(_holds(run, g) for g in golds) for run in copied_runs(answer, documents, question))


def copied_runs(answer: str, documents: str, question: str = "") -> list[str]:
    """The answer's maximal runs of >= 8 consecutive normalised words copied from the documents,
    leaving out 8-word windows that mostly restate the question."""
    a, d, q = normalize(answer).split(), normalize(documents).split(), normalize(question).split()
    k = _RECITAL_WORDS
    grams = {tuple(d[i:i + k]) for i in range(len(d) - k + 1)}
    words_q = set(q)
    # a window is the question restated when most of its words are the question's
    grams = {g for g in grams if sum(w in words_q for w in g) * 2 <= k}
    covered = [False] * len(a)
    for i in range(len(a) - k + 1):
        if tuple(a[i:i + k]) in grams:
            covered[i:i + k] = [True] * k
    runs, i = [], 0
    while i < len(a):
        if not covered[i]:
            i += 1
            continue
        j = i
        while j < len(a) and covered[j]:
            j += 1
        runs.append(" ".join(a[i:j]))
        i = j
    return runs


def degenerate(answer: str, documents: str | None = None, gold_answers: Sequence[str] = (),
               question: str = "") -> str | None:
    """None for a sound answer, else why not: "empty", "loop", "stutter" or "recital" (checked in
    that order; a word loop also repeats characters, and is named for the words)."""
    gold_answers = list(gold_answers)
    if not any(ch.isalnum() for ch in answer):
        return "empty"
    if _loop(_words(answer)):
        return "loop"
    if _stutter(answer, gold_answers):
        return "stutter"
    if documents and _recital(answer, documents, gold_answers, question):
        return "recital"
    return None


def judge(answer: str, answers: list[str], documents: str | None = None, question: str = "") -> str:
    """"correct" | "degenerate" | "wrong": correct when a normalised answer appears as whole words in
    the normalised output ("10" is not found in "100"), unless the output is degenerate."""
    if degenerate(answer, documents, answers, question):
        return "degenerate"
    out = normalize(answer)
    if any(_holds(out, normalize(a)) for a in answers):
        return "correct"
    return "wrong"
