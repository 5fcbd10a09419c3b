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
from .align import answer_token
from .move import moved_prompt, moved_span, reread_to_end, rereads, restore_seq, save_seq, shift_to_end
from .probe import strength_over_rival, strengths
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


SESSION_TOP_K = 3


@dataclass
class Condition:
    name: str
    relevance: str = "pipeline"   # "none", "pipeline" (BM25 + entities), "oracle" (the gold chunk)
    strength: float = 2.0         # 0: by prompt length (runtime.auto_strength)
    layers: str = "default"       # "default", "early", "last", "all", "global", "local", or "a-b"
    top_k: int = 3
    granularity: str = "chunk"
    order: str = "keep"           # "keep" the slot order, or "edges": best chunks at the ends (reordering)
    gate: bool = True             # False: the documents' queries are biased too (needs its own prefill)
    near: float | None = None     # strength next to the question (bias.chunk_strength); None: flat
    far: float | None = None      # strength at the prompt's first token, rising beyond the ramp (bias.chunk_strength)
    peak: float | None = None     # the ramp's top at the length's strength + peak, back to the length's at the start
    mid: float | str | tuple | None = None  # `mid` from a quarter to half the prompt before the question, down
                                    # to the length's at the start; "auto": by length (runtime.mid_strength),
                                    # (lo, hi): mid_strength's +2 at lo tokens rising to +5 at hi
    lift: bool = False            # True: no bias on the answer's own queries (Runner.answer)
    echo_run: int | None = None   # novel: bias.build's echo_run (None: bias.ECHO_RUN)
    answer_granularity: str | None = None  # the spans for the queries from the question's end on
                                    # (the answer prefix, the answer); None: `granularity` for all
    margin: float | None = None   # chunk weights exp(-(s_max - s_i)/margin) (relevance.select); None: s_i/s_max
    target: float | None = None   # the top chunk's share of the question's attention to reach (probe.py)
    per_layer: bool = True        # with target: a strength per layer from its own share, or one from their mean
    heads: int | None = None      # with target: the share over the heads that read the chunk most (None: all)
    rival: float | None = None    # instead of target: e^rival times the share of the most-read other chunk
    move: bool = False            # the top chunk (with its label) moved to the end of the documents by
                                    # shifting the cached cells' positions: reordering without a prefill
                                    # (strength 0 here: the move alone, no bias)
    reread: str = "never"         # with move: when the moved chunk is read again at the documents' end (its
                                    # cells computed there, after every other chunk) instead of its cells
                                    # shifted: "never", "first" (the documents' first chunk) or "always"
    others: float | None = None   # the bias on every chunk not selected (negative: the distractors pushed
                                    # down instead of the chunk lifted above the question and the answer)


def parse_layers(spec: str, default: list[int], softmax: list[int]) -> list[int]:
    if spec == "default":
        return default
    if spec == "all":
        return softmax
    if spec == "early":  # the default layers but the last (Gemma 3: its last global layer is the model's last)
        return default[:-1]
    if spec == "last":
        return default[-1:]
    if spec in ("global", "local"):  # sliding-window models: full-attention vs sliding layers
        return [il for il in softmax if (il in default) == (spec == "global")]
    a, b = spec.split("-")
    return [il for il in softmax if int(a) <= il <= int(b)]


def default_table():
    """The starter Engram table when set-up has built it, as the CLI uses it (rows record its size;
    the ~2K and ~4K NQ files of docs/EVAL.md were written before, without a table)."""
    from .cli import default_table_path
    from .table import Table

    p = Path(default_table_path())
    return Table(p) if p.exists() else None


MAX_NEW = {"nq": 16, "domain": 40, "kv": 96}


class Runner:
    """Decodes prompts on an EngramLlama's context with explicit KV control."""

    def __init__(self, eng, max_new: int = 16):
        from . import llama_cpp

        self.eng, self.lc, self.max_new = eng, llama_cpp, max_new
        self._saved = None  # the documents' cells while a chunk is moved (move)
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

    def move(self, a: int, b: int, q0: int, back: bool = False, reread: list[int] | None = None) -> None:
        """Shift [a, b) to the end of the documents (move.shift_to_end); back: restore the
        documents' cells from the copy taken before. reread: the prompt's tokens, the chunk's
        decoded again at the end instead of shifted (move.reread_to_end: b - a tokens read)."""
        if back:
            restore_seq(self.lc, self.ctx, self._saved)
            self._saved = None
        else:
            self._saved = save_seq(self.lc, self.ctx)
            if reread is not None:
                reread_to_end(self.lc, self.mem, lambda ids, pos0: self.decode(ids, pos0, False), reread, a, b, q0)
            else:
                shift_to_end(self.lc, self.mem, a, b, q0)

    def prefill_docs(self, tokens: list[int], q0: int) -> None:
        self.lc.llama_memory_clear(self.mem, True)
        self.decode(tokens[:q0], 0, False)

    def answer(self, tokens: list[int], q0: int, lift: bool = False,
               then: tuple[int, np.ndarray] | None = None) -> str:
        """Greedy answer after the documents' KV. lift: clear the bias once the prompt is read, so
        only the question's queries (and the first answer token's choice) are steered. then:
        (a0, bias): the bias for the queries from token a0 on (the question's keep the one set)."""
        if then:
            a0, b2 = then
            self.decode(tokens[q0:a0], q0, False)
            self.eng.hook.set_bias(b2, gate=q0)
            logits = self.decode(tokens[a0:], a0, True)
        else:
            logits = self.decode(tokens[q0:], q0, True)
        if lift:
            self.eng.hook.clear()
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
        n_ctx: int = 4096, answerable_only: bool = True, seed: int = 0, chat: bool = True, log=print,
        dataset: str = "nq", max_new: int | None = None, rerank: int | None = None,
        restate_key: bool = False, only: set[str] | None = None) -> None:
    """rerank: chunks reread for the question's likelihood (Settings.rerank); 0 ranks as r3 did.
    restate_key: KV answers start with the record's key (datasets.kv), the closed-book filter too.
    only: these item ids alone (the items where a condition can differ from one already run)."""
    from . import datasets
    from .runtime import EngramLlama, Settings, auto_strength, default_layers, mid_strength

    conditions = conditions or [Condition("vanilla", "none"), Condition("engram"), Condition("oracle", "oracle")]
    if restate_key and dataset != "kv":
        raise ValueError("restate_key is for the KV set only")
    items = datasets.load(dataset, n_passages, data, n_items=max(4 * n_items, 200), seed=seed, restate_key=restate_key)
    done, unanswerable = set(), set()
    out = Path(out_path)
    prefix = "key" if restate_key else None
    tag = {"prefix": prefix} if prefix else {}  # in every row: one file, one prompt
    if out.exists():
        for l in out.read_text().splitlines():
            r = json.loads(l)
            if r.get("prefix") != prefix:
                how = "with" if r.get("prefix") else "without"
                raise ValueError(f"{out_path} holds rows {how} the key restated; resume it {how} restate_key")
            done.add((r["id"], r["slot"], r["condition"]))
            if r["slot"] == "gold-only" and r["judge"] != "correct":
                unanswerable.add(r["id"])
    table = default_table()
    eng = EngramLlama(model, n_ctx=n_ctx, n_threads=None, settings=Settings(rerank=rerank), chat=chat, table=table,
                      probe=any(c.target or c.rival is not None for c in conditions))
    n_table = len(table) if table is not None else 0
    ranking = "r3" if rerank == 0 else relevance.RANKING
    # answers are a few words (NQ), a sentence (domain), or a restated key and a UUID (KV)
    runner = Runner(eng, max_new or MAX_NEW.get(dataset, 16))
    softmax = eng.hook.softmax_layers()
    dflt = default_layers(eng.hook.kinds)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    used = 0

    probed: dict[str, float] = {}  # condition -> the top chunk's unbiased share (target conditions)
    moved: dict[str, tuple[int, int]] = {}  # condition -> the span Runner.move shifted (undone after the answer)
    switch: dict[str, tuple[int, np.ndarray]] = {}  # condition -> (answer token, its bias) (answer_granularity)

    def apply(c: Condition, prompt, pm, scored, gold_id, question) -> float:
        if c.relevance == "none":
            eng.hook.clear()
            return 0.0
        # the oracle biases the gold, unless the prompt had no room for it (then nothing)
        sel = ([(s, 1.0) for s in scored if s.chunk.id == gold_id] if c.relevance == "oracle"
               else relevance.select(scored, c.top_k, c.margin))
        if c.move and (not c.gate or c.target or c.rival is not None):
            raise ValueError(f"{c.name}: a move needs the query gate and a plain strength")
        if c.target or c.rival is not None:
            return apply_target(c, prompt, pm, sel, question)
        strength, far = c.strength or auto_strength(len(prompt.tokens)), c.far
        if c.peak:
            strength, far = strength + c.peak, (far if far is not None else strength)
        if c.move:
            if not sel:
                eng.hook.clear()
                return 0.0
            a, b = moved_span(prompt, sel[0][0].chunk.id)
            again = rereads(c.reread, prompt, sel[0][0].chunk.id)
            runner.move(a, b, prompt.question_token, reread=prompt.tokens if again else None)
            # where the moved chunk sat (chunk_order index) and whether it was read again
            probed[c.name] = {**probed.get(c.name, {}), "moved_pos": prompt.chunk_order.index(sel[0][0].chunk.id),
                              "reread": again}
            moved[c.name] = (a, b)
            prompt = moved_prompt(prompt, a, b)
            if not c.strength:  # no bias: the move alone
                eng.hook.clear()
                return 0.0
        mid = (mid_strength(len(prompt.tokens)) if c.mid == "auto" else
               mid_strength(len(prompt.tokens), *c.mid) if isinstance(c.mid, tuple) else c.mid)
        echo = {"echo_run": c.echo_run} if c.echo_run else {}
        b, _ = bias_mod.build(prompt, sel, strength, c.granularity, pm, question, near=c.near, far=far, mid=mid, **echo)
        if c.answer_granularity:
            b2, _ = bias_mod.build(prompt, sel, strength, c.answer_granularity, pm, question, near=c.near, far=far,
                                   mid=mid, **echo)
            switch[c.name] = (answer_token(prompt, question), b2)
        if c.others is not None:
            b = bias_mod.others(prompt, b, [s.chunk.id for s, _ in sel], c.others)
        eng.hook.set_layers(parse_layers(c.layers, dflt, softmax), 1.0)
        eng.hook.set_bias(b, gate=prompt.question_token if c.gate else 0)
        return strength

    def apply_target(c: Condition, prompt, pm, sel, question) -> float:
        """The strength that gives the top chunk the target share of the question's attention (per
        layer, or one from their mean), read from an unbiased decode of the question (removed
        again from the cache). The runtime's EngramLlama._strength_for_share does the same on
        llama_cpp.Llama's cache bookkeeping; this runner decodes into its own."""
        if not sel:
            eng.hook.clear()
            return 0.0
        layers = parse_layers(c.layers, dflt, softmax)
        q0 = prompt.question_token
        eng.hook.clear()
        with eng.probe.reading(layers):
            runner.decode(prompt.tokens[q0:], q0, False)
        runner.lc.llama_memory_seq_rm(runner.mem, 0, q0, -1)
        top = sel[0][0].chunk.id
        m0 = eng.probe.share(prompt.chunk_tokens[top], c.heads)
        m0_mean = float(np.mean(list(m0.values())))
        probed[c.name] = {"m0": round(m0_mean, 5)}
        if c.rival is not None:
            others = [float(np.mean(list(eng.probe.share(span, c.heads).values())))
                      for cid, span in prompt.chunk_tokens.items() if cid != top]
            m_r = max(others, default=0.0)
            probed[c.name]["m_rival"] = round(m_r, 5)
            scales = dict.fromkeys(layers, strength_over_rival(m0_mean, m_r, c.rival))
        else:
            scales = strengths(m0, layers, c.target, c.per_layer)
        b, _ = bias_mod.build(prompt, sel[:1], 1.0, c.granularity, pm, question)
        eng.hook.set_layers(scales)
        eng.hook.set_bias(b, gate=q0)
        return float(np.mean(list(scales.values())))

    with open(out, "a") as f:
        for idx in order:
            if used >= n_items:
                break
            it = items[idx]
            if only is not None and it.id not in only:
                continue
            gold = Chunk(0, *it.gold)
            # closed-book filter: keep questions the model answers from the gold passage alone
            if it.id in unanswerable:
                continue
            if answerable_only and (it.id, "gold-only", "vanilla") not in done:
                p, *_ = eng.prepare(it.question, [gold], 16, it.answer_prefix)
                eng.hook.clear()
                runner.prefill_docs(p.tokens, p.question_token)
                ans = runner.answer(p.tokens, p.question_token)
                verdict = judge(ans, it.answers)
                f.write(json.dumps({"id": it.id, "slot": "gold-only", "condition": "vanilla", "answer": ans,
                                    "judge": verdict, "answers": it.answers, **tag}) + "\n")
                f.flush()
                if verdict != "correct":
                    continue
            used += 1
            cache: dict[tuple, dict] = {}  # (prompt tokens, condition) -> answer: reordering ignores the slot
            for slot in slots:
                todo = [c for c in conditions if (it.id, slot, c.name) not in done]
                if not todo:
                    continue
                k = {"first": 0, "middle": (n_passages - 1) // 2, "last": n_passages - 1}[slot]
                passages = list(it.distractors[:n_passages - 1])
                k = min(k, len(passages))
                passages.insert(k, it.gold)
                chunks = [Chunk(i, t, x) for i, (t, x) in enumerate(passages)]
                # one prefill per prompt order; gate-off conditions bias the documents, so each its own
                groups: dict[tuple, list[Condition]] = {}
                for c in todo:
                    groups.setdefault((c.order, "gated" if c.gate else c.name), []).append(c)
                for (order_kind, _), conds in groups.items():
                    eng.settings.order = order_kind
                    t0 = time.perf_counter()
                    prompt, pm, scored, dropped = eng.prepare(it.question, chunks, 16, it.answer_prefix)
                    if dropped:
                        log(f"{it.id}: {len(dropped)} passages did not fit")
                    # -1: the pipeline ranked the gold so low that it was dropped to fit the context
                    rank = next((r for r, s in enumerate(scored) if s.chunk.id == k), -1)
                    pos = prompt.chunk_order.index(k) if k in prompt.chunk_order else -1
                    key = tuple(prompt.tokens)
                    need = [c for c in conds if (key, c.name) not in cache]
                    t_prefill = 0.0
                    if need:
                        if not need[0].gate:
                            apply(need[0], prompt, pm, scored, k, it.question)
                        else:
                            eng.hook.clear()
                        runner.prefill_docs(prompt.tokens, prompt.question_token)
                        t_prefill = time.perf_counter() - t0
                    for c in conds:
                        if (key, c.name) not in cache:
                            t1 = time.perf_counter()
                            try:
                                strength = apply(c, prompt, pm, scored, k, it.question)
                                ans = runner.answer(prompt.tokens, prompt.question_token, lift=c.lift,
                                                    then=switch.pop(c.name, None))
                            finally:
                                eng.hook.clear()
                                if c.name in moved:
                                    runner.move(*moved.pop(c.name), prompt.question_token, back=True)
                            cache[(key, c.name)] = {"answer": ans, "strength": round(strength, 2),
                                                    **probed.pop(c.name, {}),
                                                    "prefill_s": round(t_prefill, 2),
                                                    "answer_s": round(time.perf_counter() - t1, 2)}
                        rec = {"id": it.id, "slot": slot, "condition": c.name, "question": it.question,
                               **cache[(key, c.name)],
                               "judge": judge(cache[(key, c.name)]["answer"], it.answers), "answers": it.answers,
                               "gold_rank": rank,
                               "gold_pos": pos, "n_passages": len(prompt.chunk_order), "n_tokens": len(prompt.tokens),
                               "table": n_table, "ranking": ranking, **tag}
                        f.write(json.dumps(rec) + "\n")
                        f.flush()
                    eng.settings.order = "keep"
                    if need:
                        log(f"{used:3d} {it.id:>8} {slot:6} {order_kind:5} {len(prompt.tokens)} tok, gold rank {rank}, "
                            f"prefill {t_prefill:.1f}s")
    eng.close()


def session(model: str, out_path: str, n_questions: int = 8, n_ctx: int = 8192,
            data: str = "../shared/data/nq-open-dev.jsonl.gz", seed: int = 0, chat: bool = True, log=print, rerank: int | None = None) -> None:
    """Several questions on one fixed context, as in a chat over the same documents.

    Fixed order: the documents are prefilled once and every question (vanilla or Engram, gated)
    decodes on top of that cache. Reordering puts each question's best chunks at the edges, so
    every question prefills the whole context again (reorder+Engram rides on that prefill).
    Rows give each answer's seconds; the one shared document prefill is its own row.
    """
    from . import datasets
    from .runtime import EngramLlama, Settings, auto_strength, default_layers

    items = datasets.nq(data, 15)
    eng = EngramLlama(model, n_ctx=n_ctx, n_threads=None, settings=Settings(rerank=rerank), chat=chat,
                      table=default_table())
    runner = Runner(eng)
    layers = default_layers(eng.hook.kinds)
    rng = np.random.default_rng(seed)
    out = Path(out_path)
    done = {(r["id"], r["condition"]) for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    # the questions: the first n answerable from their gold passage alone
    qs = []
    for idx in rng.permutation(len(items)):
        it = items[idx]
        p, *_ = eng.prepare(it.question, [Chunk(0, *it.gold)], 16)
        eng.hook.clear()
        runner.prefill_docs(p.tokens, p.question_token)
        if judge(runner.answer(p.tokens, p.question_token), it.answers) == "correct":
            qs.append(it)
            if len(qs) == n_questions:
                break
    answers = [normalize(a) for it in qs for a in it.answers if normalize(a)]
    # the context: their gold passages, then their hard distractors in turn, while everything fits
    # for the longest question (nothing may be dropped per question, or the cache would differ)
    passages = [it.gold for it in qs]
    pool = [d for k in range(14) for it in qs for d in it.distractors[k:k + 1]]
    longest = max((it.question for it in qs), key=len)
    for d in pool:
        if d in passages or any(a in normalize(f"{d[0]}. {d[1]}") for a in answers):
            continue
        trial = [Chunk(i, t, x) for i, (t, x) in enumerate(passages + [d])]
        _, _, _, dropped = eng.prepare(longest, trial, 48)
        if dropped:
            break
        passages.append(d)
    perm = [int(i) for i in rng.permutation(len(passages))]
    chunks = [Chunk(i, *passages[j]) for i, j in enumerate(perm)]
    gold_id = {it.id: perm.index(k) for k, it in enumerate(qs)}
    log(f"session: {len(qs)} questions, {len(chunks)} passages")

    def bias_for(prompt, pm, scored, question, near=None):
        # the top 3, as docs/results/session-smollm2-8k.jsonl was written (the runtime's default
        # then; it is top-1 now, docs/EVAL.md "Top-1 or top-3")
        sel = relevance.select(scored, SESSION_TOP_K)
        strength = auto_strength(len(prompt.tokens))
        b, _ = bias_mod.build(prompt, sel, strength, "chunk", pm, question, near=near)
        eng.hook.set_layers(layers, 1.0)
        eng.hook.set_bias(b, gate=prompt.question_token)
        return strength

    with open(out, "a") as f:
        def write(rec):
            f.write(json.dumps(rec) + "\n")
            f.flush()

        doc_tokens = None
        # all fixed-order answers first, on one document cache; then the reordered ones
        for order_kind, it in [(o, it) for o in ("keep", "edges") for it in qs]:
            gid = gold_id[it.id]
            conds = (["vanilla", "engram", "engram near2", "move", "move+engram s1"] if order_kind == "keep"
                     else ["reorder", "reorder+engram", "reorder+engram near2"])
            if all((it.id, c) in done for c in conds):
                continue
            eng.settings.order = order_kind
            t0 = time.perf_counter()
            prompt, pm, scored, dropped = eng.prepare(it.question, chunks, 48)
            assert not dropped
            prep_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            q0 = prompt.question_token
            prefill_s = 0.0
            if order_kind == "edges" or doc_tokens != prompt.tokens[:q0]:
                eng.hook.clear()
                runner.prefill_docs(prompt.tokens, q0)
                prefill_s = time.perf_counter() - t0
                if order_kind == "keep":
                    doc_tokens = prompt.tokens[:q0]
                    write({"id": "session", "condition": "document prefill", "prefill_s": round(prefill_s, 2),
                           "n_tokens": q0})
                    prefill_s = 0.0
                else:
                    doc_tokens = None
            first = True
            for c in conds:
                if (it.id, c) in done:
                    continue
                t1 = time.perf_counter()
                strength = 0.0
                moved = None
                if c.startswith("move"):
                    # the best chunk moved to the end of the cached documents (Runner.move), and
                    # reordering's +1 on it: reordering's order for that chunk, without a prefill
                    eng.hook.clear()
                    sel = relevance.select(scored, 1)
                    if sel:
                        moved = moved_span(prompt, sel[0][0].chunk.id)
                        runner.move(*moved, q0)
                        if "engram" in c:
                            strength = 1.0
                            b, _ = bias_mod.build(moved_prompt(prompt, *moved), sel, strength, "chunk", pm, it.question)
                            eng.hook.set_layers(layers, 1.0)
                            eng.hook.set_bias(b, gate=q0)
                elif "engram" in c:
                    strength = bias_for(prompt, pm, scored, it.question, 2.0 if c.endswith("near2") else None)
                else:
                    eng.hook.clear()
                ans = runner.answer(prompt.tokens, q0)
                eng.hook.clear()
                if moved:
                    runner.move(*moved, q0, back=True)
                write({"id": it.id, "condition": c, "answer": ans, "judge": judge(ans, it.answers),
                       "answers": it.answers, "gold_pos": prompt.chunk_order.index(gid),
                       "n_passages": len(chunks), "n_tokens": len(prompt.tokens), "strength": round(strength, 2),
                       "prep_s": round(prep_s if first else 0.0, 3),
                       "prefill_s": round(prefill_s if first else 0.0, 2),
                       "answer_s": round(time.perf_counter() - t1, 2)})
                first = False
            eng.settings.order = "keep"
            log(f"{it.id} {order_kind}: prefill {prefill_s:.1f}s")
    eng.close()

