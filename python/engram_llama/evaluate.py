"""Accuracy evaluation: NQ-Open questions with their gold passage hidden among hard BM25
distractors, gold at the first / middle / last slot, conditions compared on the same prompt.

The documents are prefilled once per item and slot without bias; every condition then decodes
the question and the answer on top (the query gate makes that exact) and the question's KV is
cut away again, so a condition costs a few dozen decode steps, not a prefill.
"""
from __future__ import annotations

import gzip
import json
import re
import string
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bias as bias_mod, relevance
from .chunks import Chunk

REFUSAL = re.compile(r"\b(i (do not|don't|cannot|can't) (know|find|answer|tell)|not (mentioned|provided|stated|specified|"
                     r"given|found|available)|no (information|mention)|(does|do) not (say|mention|provide|contain|specify)|"
                     r"(doesn't|don't) (say|mention|provide|contain|specify)|unable to|cannot be determined|there is no|"
                     r"none of the documents)\b")


def normalize(s: str) -> str:
    """Lost-in-the-Middle answer normalisation."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def judge(output: str, answers: list[str]) -> str:
    """correct / refusal / wrong."""
    out = normalize(output)
    if any(normalize(a) and normalize(a) in out for a in answers):
        return "correct"
    if not out or REFUSAL.search(output.lower()):
        return "refusal"
    return "wrong"


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


@dataclass
class Condition:
    name: str
    relevance: str = "pipeline"   # "none", "pipeline" (BM25 + entities), "oracle" (the gold chunk)
    strength: float = 2.0
    layers: str = "default"       # "default", "all", or "a-b"
    top_k: int = 3
    granularity: str = "chunk"


def parse_layers(spec: str, default: list[int], softmax: list[int]) -> list[int]:
    if spec == "default":
        return default
    if spec == "all":
        return softmax
    if spec in ("global", "local"):  # sliding-window models: full-attention vs sliding layers
        return [il for il in softmax if (il in default) == (spec == "global")]
    a, b = spec.split("-")
    return [il for il in softmax if int(a) <= il <= int(b)]


class Runner:
    """Decodes prompts on an EngramLlama's context with explicit KV control."""

    def __init__(self, eng, max_new: int = 16):
        from . import llama_cpp

        self.eng, self.lc, self.max_new = eng, llama_cpp, max_new
        self.ctx = eng.llm.ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = eng.llm.n_vocab()
        self.stop_ids = {eng._eos_id} | set(
            eng.llm.tokenize(b"<|im_end|>", add_bos=False, special=True)[:1] if eng.template else [])

    def decode(self, tokens: list[int], pos0: int, last_logits: bool) -> np.ndarray | None:
        lc = self.lc
        step = 512
        out = None
        for a in range(0, len(tokens), step):
            part = tokens[a:a + step]
            batch = lc.llama_batch_init(len(part), 0, 1)
            try:
                for i, t in enumerate(part):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + a + i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = last_logits and (a + i == len(tokens) - 1)
                batch.n_tokens = len(part)
                if lc.llama_decode(self.ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
            finally:
                lc.llama_batch_free(batch)
        if last_logits:
            ptr = lc.llama_get_logits_ith(self.ctx, -1)
            out = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        return out

    def prefill_docs(self, tokens: list[int], q0: int) -> None:
        self.lc.llama_memory_clear(self.mem, True)
        self.eng.hook.clear()
        self.decode(tokens[:q0], 0, False)

    def answer(self, tokens: list[int], q0: int) -> str:
        logits = self.decode(tokens[q0:], q0, True)
        out: list[int] = []
        pos = len(tokens)
        for _ in range(self.max_new):
            t = int(np.argmax(logits))
            if t in self.stop_ids:
                break
            out.append(t)
            text = self.eng.llm.detokenize(out).decode("utf-8", "ignore")
            if "\n" in text:
                break
            logits = self.decode([t], pos, True)
            pos += 1
        self.lc.llama_memory_seq_rm(self.mem, 0, q0, -1)
        return self.eng.llm.detokenize(out).decode("utf-8", "ignore").split("\n")[0].strip()


def run(model: str, out_path: str, n_items: int = 40, n_passages: int = 15, slots=("first", "middle", "last"),
        conditions: list[Condition] | None = None, data: str = "../shared/data/nq-open-dev.jsonl.gz",
        n_ctx: int = 4096, answerable_only: bool = True, seed: int = 0, chat: bool = True, log=print) -> None:
    from .runtime import EngramLlama, Settings, default_layers

    conditions = conditions or [Condition("vanilla", "none"), Condition("engram"), Condition("oracle", "oracle")]
    items = load_nq(data)
    dis = hard_distractors(items, n_passages - 1)
    by_id = {it["id"]: it for it in items}
    done = set()
    out = Path(out_path)
    if out.exists():
        for l in out.read_text().splitlines():
            r = json.loads(l)
            done.add((r["id"], r["slot"], r["condition"]))
    eng = EngramLlama(model, n_ctx=n_ctx, n_threads=None, settings=Settings(), chat=chat)
    runner = Runner(eng)
    softmax = eng.hook.softmax_layers()
    dflt = default_layers(eng.hook.kinds)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    used = 0
    with open(out, "a") as f:
        for idx in order:
            if used >= n_items:
                break
            it = items[idx]
            gold = Chunk(0, it["gold"]["title"], it["gold"]["text"])
            # closed-book filter: keep questions the model answers from the gold passage alone
            key_ok = (it["id"], "gold-only", "vanilla")
            if answerable_only:
                if key_ok in done:
                    ok = True  # recorded as answerable earlier
                else:
                    p, *_ = eng.prepare(it["question"], [gold], 16)
                    runner.prefill_docs(p.tokens, p.question_token)
                    ans = runner.answer(p.tokens, p.question_token)
                    ok = judge(ans, it["answers"]) == "correct"
                    if not ok:
                        continue
                    f.write(json.dumps({"id": it["id"], "slot": "gold-only", "condition": "vanilla", "answer": ans,
                                        "judge": "correct"}) + "\n")
                    f.flush()
            used += 1
            distract = [by_id[items[j]["id"]] for j in dis[it["id"]]]
            for slot in slots:
                if all((it["id"], slot, c.name) in done for c in conditions):
                    continue
                k = {"first": 0, "middle": (n_passages - 1) // 2, "last": n_passages - 1}[slot]
                passages = [(d["gold"]["title"], d["gold"]["text"]) for d in distract]
                passages.insert(k, (it["gold"]["title"], it["gold"]["text"]))
                chunks = [Chunk(i, t, x) for i, (t, x) in enumerate(passages)]
                t0 = time.perf_counter()
                prompt, pm, scored, dropped = eng.prepare(it["question"], chunks, 16)
                if dropped:
                    log(f"{it['id']}: {len(dropped)} passages did not fit")
                runner.prefill_docs(prompt.tokens, prompt.question_token)
                t_prefill = time.perf_counter() - t0
                rank = next(r for r, s in enumerate(scored) if s.chunk.id == k)
                for c in conditions:
                    if (it["id"], slot, c.name) in done:
                        continue
                    t1 = time.perf_counter()
                    if c.relevance == "none":
                        eng.hook.clear()
                    else:
                        sel = ([(next(s for s in scored if s.chunk.id == k), 1.0)] if c.relevance == "oracle"
                               else relevance.select(scored, c.top_k))
                        b, _ = bias_mod.build(prompt, sel, c.strength, c.granularity, pm, it["question"])
                        eng.hook.set_layers(parse_layers(c.layers, dflt, softmax), 1.0)
                        eng.hook.set_bias(b, gate=prompt.question_token)
                    ans = runner.answer(prompt.tokens, prompt.question_token)
                    eng.hook.clear()
                    rec = {"id": it["id"], "slot": slot, "condition": c.name, "answer": ans,
                           "judge": judge(ans, it["answers"]), "gold_rank": rank, "n_tokens": len(prompt.tokens),
                           "prefill_s": round(t_prefill, 2), "answer_s": round(time.perf_counter() - t1, 2)}
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                log(f"{used:3d} {it['id']:>8} {slot:6} {len(prompt.tokens)} tok, gold rank {rank}, prefill {t_prefill:.1f}s")
    eng.close()
