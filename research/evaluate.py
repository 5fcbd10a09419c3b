"""Accuracy evaluation through the product's own `EngramLlama.ask`: an item's gold passage hidden
among distractors at the first / middle / last slot, each condition a Settings override, so a
row is what `engram-llama run MODEL --chunks DOCS.jsonl "question" --json` answers for that prompt.

Conditions in the given order share the documents' prefill through the product's cache (the query
gate makes that exact); a reordered prompt prefills again.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from engram_llama.chunks import Chunk, split
from engram_llama.plan import Settings
from engram_llama.quality import degenerate

from .datasets import normalize

REFUSAL = re.compile(r"\b(i (do not|don't|cannot|can't) (know|find|answer|tell)|not (mentioned|provided|stated|specified|"
                     r"given|found|available)|no (information|mention)|(does|do) not (say|mention|provide|contain|specify)|"
                     r"(doesn't|don't) (say|mention|provide|contain|specify)|unable to|cannot be determined|there is no|"
                     r"none of the documents)\b")


def judge(output: str, answers: list[str]) -> str:
    """correct / refusal / wrong."""
    out = normalize(output)
    if any(normalize(a) and normalize(a) in out for a in answers):
        return "correct"
    if not out or REFUSAL.search(output.lower()):
        return "refusal"
    return "wrong"


ECHO_CHARS = 16  # miss_kind: a wrong answer that repeats this much of the question echoes it
NEAR = 0.8       # miss_kind: similarity to a gold answer of a near miss (a copy that slipped)


def miss_kind(output: str, answers: list[str], question: str) -> str:
    """Why a wrong answer is wrong, for the report: "echo" (it repeats >= ECHO_CHARS normalised
    characters of the question that no gold answer holds: a KV key copied, the question restated),
    "near" (it opens with a gold answer of >= 8 characters garbled, similarity >= NEAR: a copy with
    a piece repeated or dropped), or "other"."""
    from difflib import SequenceMatcher

    out, q = normalize(output), normalize(question)
    m = SequenceMatcher(None, out, q, autojunk=False).find_longest_match(0, len(out), 0, len(q))
    run = out[m.a:m.a + m.size]
    if m.size >= ECHO_CHARS and not any(run in normalize(a) for a in answers):
        return "echo"
    for a in map(normalize, answers):
        if len(a) >= 8 and max(SequenceMatcher(None, out[:len(a) + d], a, autojunk=False).ratio()
                               for d in range(-4, 5)) >= NEAR:
            return "near"
    return "other"


def default_table():
    """The starter Engram table when set-up has built it, as the CLI uses it."""
    from engram_llama.cli import default_table_path
    from engram_llama.table import Table

    p = Path(default_table_path())
    return Table(p) if p.exists() else None


MAX_NEW = {"nq": 16, "domain": 40, "kv": 96}
PRESETS = Path(__file__).resolve().parent / "presets.json"


def settings_of(over: dict, policy) -> Settings:
    """A condition's Settings; {"profile": true} applies the run's calibrated policy (--profile) as
    `run` does with that profile found (plan.with_policy), on the engine without a profile of its own;
    {"candidate": NAME[, "near": SHARE]} is one of calibrate's candidates (policy.candidates) as
    calibrate runs it, SHARE of its strength next to the question (without: 0.5, as before the share
    was the family's)."""
    from engram_llama.plan import candidate_settings, with_policy
    from engram_llama.policy import NEAR_SHARE_V1, candidates

    if "candidate" in over:
        c = next(c for c in candidates(dense=True) if c.name == over["candidate"])
        return candidate_settings(c, over.get("near", NEAR_SHARE_V1))
    rest = {k: v for k, v in over.items() if k != "profile"}
    if over.get("profile"):
        if policy is None:
            raise ValueError("a condition with \"profile\" needs --profile FILE")
        return with_policy(Settings(**rest), policy)
    return Settings(**rest)


def load_presets(path: str | Path = PRESETS) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """(conditions: name -> Settings overrides, presets: name -> condition names), checked."""
    data = json.loads(Path(path).read_text())
    conds, presets = data["conditions"], data["presets"]
    from engram_llama.policy import NEAR_SHARE_V1, candidates

    for over in conds.values():  # a bad field or value fails here, not mid-run
        if "candidate" in over:
            if set(over) - {"near"} != {"candidate"} or over["candidate"] not in {c.name for c in candidates(dense=True)}:
                raise ValueError(f"{over}: a candidate condition names one of calibrate's candidates (and a near share)")
            near = over.get("near", NEAR_SHARE_V1)
            if isinstance(near, bool) or not isinstance(near, (int, float)) or not 0 <= near <= 1:
                raise ValueError(f"{over}: near is a share of the strength, from 0 to 1")
            continue
        Settings(**{k: v for k, v in over.items() if k != "profile"})
    for p, names in presets.items():
        missing = [n for n in names if n not in conds]
        if missing:
            raise ValueError(f"preset {p}: unknown conditions {missing}")
    return conds, presets


def documents(it, slot: str, n_passages: int) -> tuple[list[tuple[str, str]], int]:
    """The item's documents with the gold at the slot, and the gold's index."""
    passages = list(it.distractors[:n_passages - 1])
    k = {"first": 0, "middle": (n_passages - 1) // 2, "last": n_passages - 1}[slot]
    k = min(k, len(passages))
    passages.insert(k, tuple(it.gold))
    return passages, k


def chunked(passages: list[tuple[str, str]], k: int) -> tuple[list[Chunk], set[int]]:
    """The documents split as `run --chunks` splits them (chunks.split), and the gold's chunk ids."""
    chunks = split(passages)
    first = len(split(passages[:k]))
    return chunks, set(range(first, first + len(split(passages[k:k + 1]))))


def run(model: str, out_path: str, conditions: dict[str, dict], n_items: int = 40, n_passages: int = 15,
        slots=("first", "middle", "last"), data: str = "../shared/data/nq-open-dev.jsonl.gz", n_ctx: int | None = None,
        answerable_only: bool = True, seed: int = 0, chat: bool = True, log=print, dataset: str = "nq",
        max_new: int | None = None, restate_key: bool = False, only: set[str] | None = None,
        skip: int = 0, n_threads: int | None = None, profile: str | None = None, record_gold: bool = False,
        kv_records: int = 1) -> None:
    """Resumable: rows already in out_path are not run again. answerable_only: only items the model
    answers from the gold passage alone (the closed-book filter, itself a vanilla `ask`).
    restate_key: KV answers start with the record's key (datasets.kv). kv_records: KV records to a
    passage (datasets.kv; calibrate's task has 4). only: these item ids.
    skip: the first `skip` items of the seeded order are left out (a split declared apart).
    n_ctx None: the model's trained context up to the CLI's --max-ctx default, so that a prompt
    the CLI would fit whole is not cut here (rows record the chunks left out, if any).
    record_gold: without the filter, still record each item's gold-only answer (a report's subset of
    the items answerable from the gold alone: the sealed split).
    profile: a calibrated profile of this model for the conditions marked {"profile": true}; every
    other condition runs the hand-tuned defaults (the engine has no profile of its own)."""
    from engram_llama.cli import DEFAULT_MAX_CTX
    from engram_llama.runtime import EngramLlama, trained_context

    from . import datasets

    if (restate_key or kv_records != 1) and dataset != "kv":
        raise ValueError("restate_key and kv_records are for the KV set only")
    if kv_records < 1:
        raise ValueError("kv_records must be at least 1")
    items = datasets.load(dataset, n_passages, data, n_items=max(4 * (n_items + skip), 200), seed=seed,
                          restate_key=restate_key, kv_records=kv_records)
    missing = sorted(only - {it.id for it in items}) if only is not None else []
    if missing:
        raise ValueError(f"{len(missing)} of the ids asked for are not in the data ({', '.join(missing[:3])}...)")
    done, unanswerable = set(), set()
    out = Path(out_path)
    prefix = "key" if restate_key else None
    tag = {"prefix": prefix} if prefix else {}  # in every row: one file, one prompt
    if kv_records != 1:
        tag["records"] = kv_records
    if out.exists():
        for l in out.read_text().splitlines():
            r = json.loads(l)
            if r.get("prefix") != prefix:
                how = "with" if r.get("prefix") else "without"
                raise ValueError(f"{out_path} holds rows {how} the key restated; resume it {how} restate_key")
            if r.get("records", 1) != kv_records:
                raise ValueError(f"{out_path} holds rows of {r.get('records', 1)} KV records to a passage, not {kv_records}")
            done.add((r["id"], r["slot"], r["condition"]))
            if r["slot"] == "gold-only" and r["judge"] != "correct":
                unanswerable.add(r["id"])
    if n_ctx is None:
        n_ctx = min(trained_context(model) or DEFAULT_MAX_CTX, DEFAULT_MAX_CTX)
    policy = None
    if profile:
        from engram_llama.gguf_check import identity
        from engram_llama.profile import read

        policy = read(profile, identity(model)).policy
    settings = {c: settings_of(conditions[c], policy) for c in conditions}
    eng = EngramLlama(model, n_ctx=n_ctx, n_threads=n_threads, chat=chat, table=default_table(), profile=None)
    n_new = max_new or MAX_NEW.get(dataset, 16)
    order = np.random.default_rng(seed).permutation(len(items))[skip:]
    # the given order's conditions first, so that they share one prefill of the documents
    names = sorted(conditions, key=lambda c: settings[c].order == "edges")
    used = 0
    with open(out, "a") as f:
        def write(rec):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()

        for idx in order:
            if used >= n_items:
                break
            it = items[idx]
            if (only is not None and it.id not in only) or (answerable_only and it.id in unanswerable):
                continue
            if (answerable_only or record_gold) and (it.id, "gold-only", "vanilla") not in done:
                a = eng.ask(it.question, split([tuple(it.gold)]), n_new, answer_prefix=it.answer_prefix,
                            settings=Settings(engram=False, order="keep"))
                verdict = judge(a.text, it.answers)
                write({"id": it.id, "slot": "gold-only", "condition": "vanilla", "answer": a.text,
                       "finish": a.finish_reason or "stop", "judge": verdict, "answers": it.answers, **tag})
                if verdict != "correct" and answerable_only:
                    continue
            used += 1
            for slot in slots:
                todo = [c for c in names if (it.id, slot, c) not in done]
                if not todo:
                    continue
                passages, k = documents(it, slot, n_passages)
                chunks, gold_ids = chunked(passages, k)
                docs_text = "\n".join(c.text for c in chunks)
                for c in todo:
                    t0 = time.perf_counter()
                    a = eng.ask(it.question, chunks, n_new, answer_prefix=it.answer_prefix,
                                settings=settings[c])
                    rank = next((r for r, s in enumerate(a.scored) if s.chunk.id in gold_ids), -1)
                    pos = next((p for p, cid in enumerate(a.chunk_order) if cid in gold_ids), -1)
                    write({"id": it.id, "slot": slot, "condition": c, "question": it.question, "answer": a.text,
                           "finish": a.finish_reason or "stop", "judge": judge(a.text, it.answers), "answers": it.answers, "gold_rank": rank,
                           "degenerate": degenerate(a.text, docs_text, it.answers, it.question),
                           "gold_pos": pos, "n_passages": len(passages), "n_tokens": a.n_prompt_tokens,
                           "dropped": [c.id for c in a.dropped],
                           "plan": {key: v for key, v in a.plan.to_json().items() if key != "spans"},
                           "seconds": round(time.perf_counter() - t0, 2), **tag})
                log(f"{used:3d} {it.id:>8} {slot:6} {a.n_prompt_tokens} tok, gold rank {rank}")
    eng.close()
