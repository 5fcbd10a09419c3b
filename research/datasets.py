"""Evaluation items: a question, its answers, the gold passage and the passages it hides among.

Three sources, one shape (Item), so the harness treats them alike:
- NQ-Open with hard BM25 distractors (real questions, real Wikipedia text);
- key-value retrieval (random UUIDs: nothing but the key itself says which record answers);
- a generated, seeded domain set in the product's territory (Indian districts, schemes, rupee
  amounts, Hindi), where every passage looks alike and only the right entities answer.
"""
from __future__ import annotations

import gzip
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    answers: list[str]
    gold: tuple[str, str]                  # (title, text)
    distractors: list[tuple[str, str]]
    answer_prefix: str | None = None       # align.render's; None: the prompt's default


def normalize(s: str) -> str:
    """Lost-in-the-Middle answer normalisation."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def load_nq(path: str | Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(l) for l in f]


def hard_distractors(items: list[dict], k: int) -> dict[str, list[int]]:
    """For each item, the k passages of other items ranked highest by BM25 against its question,
    dropping any passage that contains one of its answers."""
    import bm25s

    texts = [f"{it['gold']['title']}. {it['gold']['text']}" for it in items]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    norm_texts = [normalize(t) for t in texts]
    out = {}
    qtok = bm25s.tokenize([it["question"] for it in items], stopwords="en", show_progress=False)
    res, _ = retriever.retrieve(qtok, k=min(len(items), 4 * k + 8), show_progress=False)
    for i, it in enumerate(items):
        answers = [normalize(a) for a in it["answers"] if normalize(a)]
        picks = []
        for j in res[i]:
            j = int(j)
            if j == i or any(a in norm_texts[j] for a in answers):
                continue
            picks.append(j)
            if len(picks) == k:
                break
        out[it["id"]] = picks
    return out


def nq(path: str | Path, n_passages: int) -> list[Item]:
    raw = load_nq(path)
    dis = hard_distractors(raw, n_passages - 1)
    out = []
    for it in raw:
        d = [(raw[j]["gold"]["title"], raw[j]["gold"]["text"]) for j in dis[it["id"]]]
        out.append(Item(it["id"], it["question"], it["answers"], (it["gold"]["title"], it["gold"]["text"]), d))
    return out


KV_TITLE = "record"


def kv_text(key: str, value: str) -> str:
    return f'"{key}": "{value}"'


def kv(path: str | Path, n_passages: int, restate_key: bool = False, records: int = 1) -> list[Item]:
    """Each record is one passage; the other records of the item are the distractors, in their
    given order, cut to n_passages - 1. restate_key: the answer starts by restating the record's
    key, 'Answer: "KEY": "', so the value is its continuation (Liu et al.'s KV prompt ends with
    the key likewise). records > 1: passages of that many records, as calibrate's KV task has
    them: the gold record at a line drawn from the item's id among the item's first records - 1
    other records, the rest in blocks in their order (a last block short of records left out)."""
    out = []

    for it in load_nq(path):
        others = [kv_text(k, v) for k, v in it["ordered_kv_records"] if k != it["key"]]
        gold = kv_text(it["key"], it["value"])
        if records > 1:
            line = random.Random(it["id"]).randrange(records)
            block = others[:records - 1]
            gold = "\n".join(block[:line] + [gold] + block[line:])
            rest = others[records - 1:]
            others = ["\n".join(rest[i:i + records]) for i in range(0, len(rest) - records + 1, records)]
        q = f'What is the value of the key "{it["key"]}"?'
        prefix = f'Answer: {kv_text(it["key"], "")[:-1]}' if restate_key else None
        out.append(Item(it["id"], q, [it["value"]], (KV_TITLE, gold),
                        [(KV_TITLE, t) for t in others[:n_passages - 1]], prefix))
    return out


# --- the generated domain set ---------------------------------------------------------------

YEARS = ["2019-20", "2020-21", "2021-22", "2022-23", "2023-24", "2024-25"]
HINDI = [("ग्राम पंचायत", "Gram Panchayat"), ("किसान", "kisan"), ("योजना", "yojana"), ("लाभार्थी", "labharthi")]
OFFICERS = ["Meena Iyer", "Rakesh Verma", "Anil Kumar Das", "Priya Nair", "Sunita Yadav", "Farhan Qureshi",
            "Deepak Joshi", "Lakshmi Reddy", "Harpreet Kaur", "Sanjay Patil", "Kavita Menon", "Arjun Singh"]


def _names(kind: str) -> list[str]:
    from engram_llama.starter import DATA

    return [json.loads(l)["name"] for l in (DATA / f"{kind}.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]


def _record(rng: random.Random, scheme: str, district: str, year: str, banks: list[str]) -> dict:
    return {"scheme": scheme, "district": district, "year": year,
            "amount": f"{rng.randint(12, 980)}.{rng.randint(1, 9)}",
            "beneficiaries": f"{rng.randint(11, 480)},{rng.randint(0, 999):03d}",
            "bank": rng.choice(banks), "officer": rng.choice(OFFICERS),
            "blocks": rng.randint(3, 24), "pct": rng.randint(61, 99), "hindi": rng.choice(HINDI)}


def _render(r: dict) -> str:
    hi, hi_lat = r["hindi"]
    return (f"Under {r['scheme']}, the {r['district']} district administration released Rs {r['amount']} crore "
            f"in {r['year']} to {r['beneficiaries']} beneficiaries. Payments went through {r['bank']}, and "
            f"{r['pct']}% of them were credited within 30 days. Camps at {hi} ({hi_lat}) level were held in "
            f"{r['blocks']} blocks, and the nodal officer, {r['officer']}, reviewed the "
            f"{r['district']} accounts every quarter.")


QUESTIONS = {
    "amount": ("How much money, in crore rupees, was released under {scheme} in {district} district in {year}?",
               lambda r: [r["amount"]]),
    "beneficiaries": ("How many beneficiaries received {scheme} payments in {district} district in {year}?",
                      lambda r: [r["beneficiaries"], r["beneficiaries"].replace(",", "")]),
    "bank": ("Which bank made the {scheme} payments in {district} district in {year}?",
             lambda r: [r["bank"]]),
    "officer": ("Who was the nodal officer for {scheme} in {district} district in {year}?",
                lambda r: [r["officer"]]),
}


def domain(n_items: int, n_passages: int, seed: int = 0) -> list[Item]:
    """Seeded items: three in four distractors share two of the gold's three keys (scheme,
    district, year), the rest are random bulletins, so neither the scheme, the district nor the
    year alone finds the gold."""
    rng = random.Random(seed)
    schemes, districts = _names("schemes"), _names("districts")
    banks = [b for b in _names("banks") if "Bank" in b]  # not the regulators
    out = []
    for i in range(n_items):
        s, d, y = rng.choice(schemes), rng.choice(districts), rng.choice(YEARS)
        gold = _record(rng, s, d, y, banks)
        tmpl, ans = QUESTIONS[rng.choice(sorted(QUESTIONS))]
        seen = {(s, d, y)}
        dis = []
        kinds = ["district", "scheme", "year", "any"]
        tries = 0
        while len(dis) < n_passages - 1:
            # by attempt, not by distractor count: a kind that has run out of new keys (only five
            # other years) hands its turn on instead of being asked for ever
            kind = kinds[tries % len(kinds)]
            tries += 1
            s2 = s if kind in ("district", "year") else rng.choice(schemes)
            d2 = d if kind in ("scheme", "year") else rng.choice(districts)
            y2 = y if kind in ("scheme", "district") else rng.choice(YEARS)
            if kind == "any":
                s2, d2, y2 = rng.choice(schemes), rng.choice(districts), rng.choice(YEARS)
            if (s2, d2, y2) in seen:
                continue
            r = _record(rng, s2, d2, y2, banks)
            # no distractor may carry the gold answer (a shared bank or officer would be a second gold)
            if any(a in _render(r) for a in ans(gold)):
                continue
            seen.add((s2, d2, y2))
            dis.append(r)
        rng.shuffle(dis)
        out.append(Item(f"dom-{seed}-{i}", tmpl.format(**gold), ans(gold), ("district bulletin", _render(gold)),
                        [("district bulletin", _render(r)) for r in dis]))
    return out


def load(name: str, n_passages: int, path: str | Path | None = None, n_items: int = 400, seed: int = 0,
         restate_key: bool = False, kv_records: int = 1) -> list[Item]:
    if name == "nq":
        return nq(path, n_passages)
    if name == "kv":
        return kv(path, n_passages, restate_key, kv_records)
    if name == "domain":
        return domain(n_items, n_passages, seed)
    if name == "bulletin":
        return bulletin(n_items, n_passages, seed)
    raise ValueError(f"unknown dataset {name!r} (nq, kv, domain, bulletin)")


def bulletin(n_items: int, n_passages: int, seed: int) -> list[Item]:
    """The calibration task's bulletins (engram_llama.tasks: the answering sentence anywhere among
    boilerplate), as items; the sealed split uses a seed calibration never does."""
    from engram_llama import tasks

    out = []
    for i, t in enumerate(tasks.generate("bulletin", n_items, seed, n_distractors=max(n_passages - 1, 1))):
        out.append(Item(f"bul-{seed}-{i}", t.question, t.answers, (t.gold.source, t.gold.text),
                        [(c.source, c.text) for c in t.distractors], t.answer_prefix))
    return out
