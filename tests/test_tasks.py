"""Calibration tasks (engram_llama.tasks) and answer scoring (engram_llama.quality): no model."""
import re

import pytest

from engram_llama import tasks
from engram_llama.chunks import Chunk
from engram_llama.quality import degenerate, judge, normalize
from engram_llama.tasks import KINDS, Task, generate, place

N = 12


@pytest.fixture(scope="module", params=KINDS)
def kind_tasks(request):
    return request.param, generate(request.param, N, seed=3, n_distractors=40)


def test_deterministic_per_seed():
    for kind in KINDS:
        a, b = generate(kind, 5, seed=7), generate(kind, 5, seed=7)
        assert a == b
        c = generate(kind, 5, seed=8)
        assert [t.question for t in a] != [t.question for t in c]


def test_shape(kind_tasks):
    kind, ts = kind_tasks
    assert len(ts) == N
    for t in ts:
        assert isinstance(t, Task) and t.kind == kind
        assert t.answers and all(isinstance(a, str) and a for a in t.answers)
        assert isinstance(t.gold, Chunk) and len(t.distractors) == 40
        assert len({c.text for c in [t.gold, *t.distractors]}) == 41


def test_answer_once_in_gold_never_in_distractors(kind_tasks):
    _, ts = kind_tasks
    for t in ts:
        assert t.gold.text.count(t.answers[0]) == 1
        assert normalize(t.gold.text).count(normalize(t.answers[0])) == 1
        for c in t.distractors:
            assert not any(normalize(a) in normalize(c.text) or a in c.text for a in t.answers), (t.question, c.text)
        # the gold answers its question by the judge's own measure
        assert judge(t.answers[0], t.answers, "\n".join(c.text for c in t.distractors)) == "correct"


def _answer_position(t: Task) -> int:
    """Index of the gold's line (kv) or sentence (bulletin, prose) that holds the answer."""
    parts = t.gold.text.split("\n") if t.kind == "kv" else re.split(r"(?<=[.!?])\s+", t.gold.text)
    return next(i for i, p in enumerate(parts) if t.answers[0] in p)


def test_answer_position_varies_inside_gold():
    for kind in KINDS:
        ts = generate(kind, 20, seed=11, n_distractors=10)
        positions = {_answer_position(t) for t in ts}
        assert len(positions) >= 2, (kind, positions)
        if kind == "kv":
            assert positions - {0}
        if kind == "bulletin":
            assert 0 not in positions    # the header sentence never answers


def test_kv():
    for t in generate("kv", 5, seed=1, n_distractors=30):
        m = re.fullmatch(r'What is the value of the key "([0-9a-f-]{36})"\?', t.question)
        assert m
        key = m.group(1)
        recs = [re.fullmatch(r'"([0-9a-f-]{36})": "([0-9a-f-]{36})"', line) for c in [t.gold, *t.distractors]
                for line in c.text.split("\n")]
        assert all(recs) and len(recs) == 4 * 31
        keys = [r.group(1) for r in recs]
        assert len(set(keys)) == len(keys)
        assert dict(r.groups() for r in recs)[key] == t.answers[0]
        assert f'"{key}": "{t.answers[0]}"' in t.gold.text
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", key)
        assert {c.source for c in [t.gold, *t.distractors]} == {"records"}


def _keys(text: str) -> tuple[str, str, str]:
    return re.match(r"This bulletin covers (.+) in (.+) district for (\d{4}-\d\d)\.", text).groups()


def test_bulletin():
    ts = generate("bulletin", 10, seed=5, n_distractors=80)
    for t in ts:
        s, d, y = _keys(t.gold.text)
        assert s in t.question and d in t.question and y in t.question
        sentences = re.split(r"(?<=[.!?])\s+", t.gold.text)
        assert 5 <= len(sentences) <= 7
        all_keys = [_keys(c.text) for c in [t.gold, *t.distractors]]
        assert len(set(all_keys)) == len(all_keys)
        hard = sum(sum(a == b for a, b in zip(k, (s, d, y))) == 2 for k in all_keys[1:])
        assert 0.6 <= hard / len(t.distractors) <= 0.9
        assert {c.source for c in [t.gold, *t.distractors]} == {"district bulletin"}
        if re.fullmatch(r"\d+,\d{3}", t.answers[0]):
            assert t.answers == [t.answers[0], t.answers[0].replace(",", "")]
    assert len({t.question.split()[0] for t in ts}) >= 2      # more than one fact asked


def test_prose():
    corpus = "\n".join(p for _, p in tasks._paragraphs())
    ts = generate("prose", 30, seed=2, n_distractors=60)
    items = tasks._cloze_items()
    for t in ts:
        assert t.question.startswith('Fill in the blank from the documents: "') and "____" in t.question
        sentence = t.question.split('"', 1)[1].rsplit('"', 1)[0]
        assert sentence.replace("____", t.answers[0]) in t.gold.text
        assert corpus.count(t.answers[0]) == 1              # the blank has one answer in the corpus
        assert not t.gold.text.startswith("#") and t.gold.source
        sources = [c.source for c in t.distractors]
        assert "district bulletin" in sources and len(set(sources)) > 2
        first_bulletin = sources.index("district bulletin")
        assert any(s != "district bulletin" for s in sources[first_bulletin:])   # samples spread, not only first
    assert len({t.question for t in ts}) == min(30, len(items))            # cycles only when n exceeds the items
    first = [t.question for t in generate("prose", 3, seed=9)]
    assert first != [t.question for t in ts[:3]]


def test_place():
    t = generate("bulletin", 1, seed=4, n_distractors=10)[0]
    for n in (1, 2, 5, 11):
        for slot, want in (("first", 0), ("middle", n // 2), ("last", n - 1)):
            chunks, at = place(t, slot, n)
            assert at == want and len(chunks) == n
            assert chunks[at].text == t.gold.text
            assert [c.id for c in chunks] == list(range(n))
            assert [c.text for c in chunks[:at] + chunks[at + 1:]] == [c.text for c in t.distractors[:n - 1]]
    for bad in (0, 12):
        with pytest.raises(ValueError):
            place(t, "first", bad)
    with pytest.raises(ValueError):
        place(t, "end", 3)
    with pytest.raises(ValueError):
        generate("nq", 1, 0)


DOC = ("This bulletin covers PM-KISAN in Ernakulam district for 2022-23. Grievances may be raised at the block "
       "office within 30 days. Payments were made through State Bank of India.")

VERDICTS = [
    # answer, accepted answers, verdict, degenerate reason
    ("412.7 crore", ["412.7"], "correct", None),
    ("State Bank of India", ["State Bank of India"], "correct", None),
    ("Meena Iyer", ["Meena Iyer"], "correct", None),
    ("The value is 3f2a9c1e-1a2b-4c3d-8e9f-0a1b2c3d4e5f", ["3f2a9c1e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"], "correct", None),
    ("1,000,000", ["1,000,000"], "correct", None),
    ("1,00,00,000", ["1,00,00,000"], "correct", None),
    ("Rs 100 crore in 2022-23", ["100"], "correct", None),
    ("123456 beneficiaries", ["123,456", "123456"], "correct", None),
    ("Payments were made through State Bank of India.", ["State Bank of India"], "correct", None),
    ("Canara Bank", ["State Bank of India"], "wrong", None),
    ("Rs 4127 crore", ["412.7"], "wrong", None),
    ("100", ["10"], "wrong", None),
    ("PhilPhilPhil", ["Phil"], "degenerate", "stutter"),
    ("1800-1800-1800-", ["1800"], "degenerate", "stutter"),
    # a value run into zeros is no number: 16 of one digit; 15, or a long formatted number, pass
    ("The value is 1334580000000000000000000", ["133458"], "degenerate", "stutter"),
    ("a1334580-0545-450f-a935-86a6eef716d4 is 100000000000000000000", ["a1334580-0545-450f-a935-86a6eef716d4"],
     "degenerate", "stutter"),
    ("It is 1" + "0" * 16, ["x"], "degenerate", "stutter"),
    ("It is 1" + "0" * 15, ["x"], "wrong", None),
    ("It is 1" + "0" * 20, ["1" + "0" * 20], "correct", None),   # the gold's own digits
    ("It is 1,000,000,000,000,000,000,000", ["x"], "wrong", None),
    ("Call 1212121212121212 now", ["x"], "wrong", None),       # two digits in turn: not one digit
    ("the the the the", ["the"], "degenerate", "loop"),
    ("is 4 is 4 is 4", ["4"], "degenerate", "loop"),
    ("State Bank of India, State Bank of India, State Bank of India", ["State Bank of India"], "degenerate", "loop"),
    ("Grievances may be raised at the block office within 30 days.", ["State Bank of India"], "degenerate", "recital"),
    ("  ... ", ["x"], "degenerate", "empty"),
    # a currency sign against the number leaves it a whole word; a copied run without the
    # answer is a recital
    ("₹6,000 a year", ["6,000"], "correct", None),
    ("₹60,000", ["6,000"], "wrong", None),
    ("Payments were made through State Bank of India in Ernakulam", ["Canara Bank"], "degenerate", "recital"),
]


@pytest.mark.parametrize("answer,answers,verdict,reason", VERDICTS)
def test_judge(answer, answers, verdict, reason):
    assert degenerate(answer, DOC, answers) == reason
    assert judge(answer, answers, DOC) == verdict


def test_restating_the_question_is_not_a_recital():
    q = "How much money was released under PM-KISAN in Ernakulam district in 2022-23 by the state?"
    ans = "The money released under PM-KISAN in Ernakulam district in 2022-23 by the state was Rs"
    docs = ("Funds released under PM-KISAN in Ernakulam district in 2022-23 by the state government were "
            "audited. Rs 412.7 crore was released.")
    assert degenerate(ans, docs, ["412.7"], q) is None and judge(ans, ["412.7"], docs, q) == "wrong"
    assert degenerate(ans, docs, ["412.7"]) == "recital"  # without the question it looks like one


def test_quality_details():
    assert normalize("The Rs. 412.7 crore, paid.") == "rs 412.7 crore paid"
    assert normalize("1,000,000 and 123,456.") == "1,000,000 and 123,456"
    # a recital needs documents; without them the same sentence is just a wrong answer
    boiler = "Grievances may be raised at the block office within 30 days."
    assert degenerate(boiler) is None and judge(boiler, ["412.7"]) == "wrong"
    # seven copied words are not yet a recital
    assert degenerate("Grievances may be raised at the block", DOC, ["x"]) is None
