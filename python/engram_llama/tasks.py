"""Calibration tasks, generated offline: a question, its answers, the gold chunk and the distractor
chunks it hides among, for `engram-llama calibrate` to measure per model whether (and how strongly)
steering helps. No network and no dataset files: everything comes from a seeded random.Random, the
starter table's names and the shipped sample documents, so a seed always gives the same tasks.

Three kinds, from artificial to natural:
- "kv": blocks of random UUID records; only the key itself says which record answers;
- "bulletin": district bulletins that look alike, most distractors sharing two of the gold's three
  keys (scheme, district, year), so only the right combination answers;
- "prose": cloze questions on the sample documents' own sentences, among the other paragraphs and
  bulletins.
In every kind the answer sits at a random place inside its chunk, so a model (or a bias) that only
reads a chunk's first line does not pass.
"""
from __future__ import annotations

import json
import random
import re
import uuid
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from .chunks import Chunk
from .quality import normalize

KINDS = ("kv", "bulletin", "prose")
VERSION = 1             # raise on any change to what a seed generates: calibrate's logs of another version start afresh
SLOTS = ("first", "middle", "last")
SAMPLES = Path(__file__).parent / "samples" / "docs"


@dataclass
class Task:
    kind: str
    question: str
    answers: list[str]          # a correct output contains one of them (after quality.normalize)
    gold: Chunk
    distractors: list[Chunk] = field(default_factory=list)   # enough for the longest prompt; callers take a prefix
    answer_prefix: str | None = None


def generate(kind: str, n: int, seed: int, n_distractors: int = 80) -> list[Task]:
    """n tasks of one kind, each with n_distractors distractor chunks; the same for the same seed."""
    if kind == "kv":
        rng = random.Random(seed)
        return [_kv(rng, n_distractors) for _ in range(n)]
    if kind == "bulletin":
        rng = random.Random(seed)
        return [_bulletin(rng, n_distractors) for _ in range(n)]
    if kind == "prose":
        return _prose(n, seed, n_distractors)
    raise ValueError(f"unknown task kind {kind!r} ({', '.join(KINDS)})")


def place(task: Task, slot: str, n_chunks: int) -> tuple[list[Chunk], int]:
    """The prompt's chunks: the gold at the slot's index among the first n_chunks - 1 distractors
    (in their order), ids renumbered in list order; and the gold's index."""
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r} ({', '.join(SLOTS)})")
    if n_chunks < 1 or n_chunks - 1 > len(task.distractors):
        raise ValueError(f"n_chunks must be 1..{len(task.distractors) + 1}, not {n_chunks}")
    at = {"first": 0, "middle": n_chunks // 2, "last": n_chunks - 1}[slot]
    chunks = list(task.distractors[:n_chunks - 1])
    chunks.insert(at, task.gold)
    return [Chunk(i, c.source, c.text) for i, c in enumerate(chunks)], at


def _contains_any(text: str, answers: list[str]) -> bool:
    """Plain substring test on normalised text: stricter than the judge, so no distractor can
    carry a gold answer even inside a longer number or name ("Indian Bank" in "South Indian Bank")."""
    t = normalize(text)
    return any(normalize(a) and normalize(a) in t for a in answers)


# --- kv -----------------------------------------------------------------------------------

RECORDS, KV_SOURCE = 4, "records"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))   # the seeded rng's bits, uuid4's format


def _kv(rng: random.Random, n_distractors: int) -> Task:
    """Blocks of RECORDS records; the gold record at a random line of its block."""
    keys: set[str] = set()

    def block() -> list[tuple[str, str]]:
        out = []
        while len(out) < RECORDS:
            k = _uuid(rng)
            if k not in keys:
                keys.add(k)
                out.append((k, _uuid(rng)))
        return out

    def text(recs: list[tuple[str, str]]) -> str:
        return "\n".join(f'"{k}": "{v}"' for k, v in recs)

    gold = block()
    key, value = gold[rng.randrange(RECORDS)]
    dis = [Chunk(i + 1, KV_SOURCE, text(block())) for i in range(n_distractors)]
    return Task("kv", f'What is the value of the key "{key}"?', [value], Chunk(0, KV_SOURCE, text(gold)), dis)


# --- bulletin -----------------------------------------------------------------------------

BULLETIN_SOURCE = "district bulletin"
YEARS = ["2019-20", "2020-21", "2021-22", "2022-23", "2023-24", "2024-25"]
OFFICERS = ["Meena Iyer", "Rakesh Verma", "Anil Kumar Das", "Priya Nair", "Sunita Yadav", "Farhan Qureshi",
            "Deepak Joshi", "Lakshmi Reddy", "Harpreet Kaur", "Sanjay Patil", "Kavita Menon", "Arjun Singh"]
BOILERPLATE = [
    "The helpline number is printed on the back of every sanction letter.",
    "Grievances may be raised at the block office within 30 days.",
    "Beneficiary lists are displayed at the Gram Panchayat office every month.",
    "Applications received after the cut-off date are carried over to the next cycle.",
    "Field verification was completed by the block development officers before payment.",
    "Social audit reports are placed before the Gram Sabha for discussion.",
    "Payments are made only into Aadhaar-seeded accounts of the beneficiaries.",
    "Duplicate applications are rejected at the district level after scrutiny.",
    "Monthly progress is uploaded to the state dashboard by the district cell.",
    "Special camps were organised in remote villages to complete enrolment.",
    "Records of the scheme are kept open for public inspection on working days.",
    "Complaints about delays should be addressed to the office of the district collector.",
]
# field: (question, fact sentences, value maker, answers from the value)
FACTS = {
    "amount": ("How much money, in crore rupees, was released under {s} in {d} district in {y}?",
               ["Rs {v} crore was released to beneficiaries during the year.",
                "The amount released under the scheme stands at Rs {v} crore."],
               lambda rng, banks: f"{rng.randint(12, 980)}.{rng.randint(1, 9)}", lambda v: [v]),
    "beneficiaries": ("How many beneficiaries received {s} payments in {d} district in {y}?",
                      ["Payments reached {v} beneficiaries in the district.",
                       "A total of {v} beneficiaries were covered this year."],
                      lambda rng, banks: f"{rng.randint(11, 480)},{rng.randint(0, 999):03d}",
                      lambda v: [v, v.replace(",", "")]),
    "bank": ("Which bank made the {s} payments in {d} district in {y}?",
             ["Payments were made through {v}.", "{v} was the paying bank for the scheme."],
             lambda rng, banks: rng.choice(banks), lambda v: [v]),
    "officer": ("Who was the nodal officer for {s} in {d} district in {y}?",
                ["The nodal officer is {v}.", "{v} served as the nodal officer for the scheme."],
                lambda rng, banks: rng.choice(OFFICERS), lambda v: [v]),
}


@cache
def _names(kind: str) -> tuple[str, ...]:
    from .starter import DATA

    lines = (DATA / f"{kind}.jsonl").read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(l)["name"] for l in lines if l.strip())


def _bulletin_text(rng: random.Random, s: str, d: str, y: str, fact: str) -> str:
    """5-7 sentences: the header, 3-5 boilerplate ones, and the fact at a random place after the header."""
    body = rng.sample(BOILERPLATE, rng.randint(3, 5))
    body.insert(rng.randint(0, len(body)), fact)
    return " ".join([f"This bulletin covers {s} in {d} district for {y}."] + body)


def _bulletin(rng: random.Random, n_distractors: int) -> Task:
    """About three in four distractors share two of the gold's (scheme, district, year), the rest
    are random, so no single key finds the gold; all carry the asked field, with other values."""
    schemes, districts = _names("schemes"), _names("districts")
    banks = [b for b in _names("banks") if "Bank" in b]
    f = rng.choice(sorted(FACTS))
    q, templates, value, answers = FACTS[f]
    s, d, y = rng.choice(schemes), rng.choice(districts), rng.choice(YEARS)
    v = value(rng, banks)
    gold = _bulletin_text(rng, s, d, y, rng.choice(templates).format(v=v))
    seen, dis, tries = {(s, d, y)}, [], 0
    while len(dis) < n_distractors:
        # by attempt, not by distractor count: a kind out of new keys (five other years) hands its turn on
        kind = ("district", "scheme", "year", "any")[tries % 4]
        tries += 1
        k = (s if kind in ("district", "year") else rng.choice(schemes),
             d if kind in ("scheme", "year") else rng.choice(districts),
             y if kind in ("scheme", "district") else rng.choice(YEARS))
        if kind == "any":
            k = (rng.choice(schemes), rng.choice(districts), rng.choice(YEARS))
        v2 = value(rng, banks)
        if k in seen or v2 == v:
            continue
        text = _bulletin_text(rng, *k, rng.choice(templates).format(v=v2))
        if _contains_any(text, answers(v)):
            continue
        seen.add(k)
        dis.append(text)
    rng.shuffle(dis)
    return Task("bulletin", q.format(s=s, d=d, y=y), answers(v), Chunk(0, BULLETIN_SOURCE, gold),
                [Chunk(i + 1, BULLETIN_SOURCE, t) for i, t in enumerate(dis)])


# --- prose --------------------------------------------------------------------------------

_NUMBER = re.compile(r"\d[\d,.]*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@cache
def _paragraphs() -> tuple[tuple[str, str], ...]:
    """(heading, paragraph) of the sample documents, headings dropped from the text."""
    out = []
    for p in sorted(SAMPLES.glob("*.md")):
        title = p.stem
        for para in re.split(r"\n\s*\n", p.read_text(encoding="utf-8")):
            para = " ".join(para.split())
            if para.startswith("#"):
                title = para.lstrip("#").strip()
            elif para:
                out.append((title, para))
    return tuple(out)


def _joined(ch: str) -> bool:
    return bool(ch) and (ch.isalnum() or ch in "-_")


def _numbers(sentence: str) -> list[tuple[int, int, str]]:
    """(start, end, number) of the standalone numbers of a sentence: not part of a longer token
    ("80C", "PM-2") and without a trailing full stop or comma."""
    out = []
    for m in _NUMBER.finditer(sentence):
        num = m.group().rstrip(".,")
        start, end = m.start(), m.start() + len(num)
        if not _joined(sentence[start - 1:start]) and not _joined(sentence[end:end + 1]):
            out.append((start, end, num))
    return out


@cache
def _cloze_items() -> tuple[tuple[int, str, str], ...]:
    """(paragraph index, question sentence, number) for each number that occurs once in the whole
    sample corpus (also without its thousands commas), so the blank has one answer."""
    paras = _paragraphs()
    corpus = "\n".join(t for _, t in paras)
    out = []
    for i, (_, text) in enumerate(paras):
        for sent in _SENTENCE.split(text):
            for start, end, num in _numbers(sent):
                plain = num.replace(",", "")
                if corpus.count(num) == 1 and (plain == num or plain not in corpus):
                    out.append((i, sent[:start] + "____" + sent[end:], num))
    return tuple(out)


def _prose(n: int, seed: int, n_distractors: int) -> list[Task]:
    """Cloze questions over the samples; the items in a seeded order, cycled when n exceeds them
    (each cycle with its own distractors and order)."""
    rng = random.Random(seed)
    paras, items = _paragraphs(), list(_cloze_items())
    rng.shuffle(items)
    out = []
    for j in range(n):
        i, sent, num = items[j % len(items)]
        answers = [num] + ([num.replace(",", "")] if "," in num else [])
        pool = [Chunk(0, t, p) for k, (t, p) in enumerate(paras) if k != i and not _contains_any(p, answers)]
        pool = rng.sample(pool, min(len(pool), n_distractors))
        brng = random.Random(seed + 1_000_003 * (j + 1))       # the bulletin generator, seed offset
        while len(pool) < n_distractors:
            b = _bulletin(brng, n_distractors - len(pool))
            pool += [c for c in [b.gold, *b.distractors] if not _contains_any(c.text, answers)]
        pool = pool[:n_distractors]
        rng.shuffle(pool)
        dis = [Chunk(k + 1, c.source, c.text) for k, c in enumerate(pool)]
        title, text = paras[i]
        out.append(Task("prose", f'Fill in the blank from the documents: "{sent}"', answers, Chunk(0, title, text), dis))
    return out
