"""`engram-llama calibrate`: measure on the user's own model whether steering helps, and which of a
few candidate policies (policy.candidates) to keep, then write the model's profile.

Offline tasks of three kinds (tasks.py) at the length the user runs, the answer at the first /
middle / last chunk; per item and placement the documents are prefilled once and every candidate
in the given order answers on the cached documents (the query gate keeps them unbiased, so this
is exact), then the reordered prompt (identical across placements, so read once per item).
Answers are scored by quality.judge: a loop, a stutter or a recited chunk is a failure even when
it holds the answer. Each placement's row is appended to a log in the cache folder as soon as it
is done, so Ctrl-C loses nothing and the same command resumes; the budget counts the time of
every run of that log.

The choice (docs/CALIBRATE.md): a candidate qualifies if, paired per item against vanilla (an
item's net over its three placements), it wins more items than it loses with a one-sided sign
test at ALPHA, is not SLOT_LOSS or more answers net behind at any slot, and does not give
significantly more degenerate answers than vanilla (the sign test at ALPHA on the placements where
one of the two is degenerate: counts of 0-3 are noise). In the
given order the qualifying candidate with the most correct answers is kept (ties: the earlier,
milder one), none: no bias. Reordering is kept for retrieved chunks if a reordered candidate
qualifies and is not behind the given order's choice (paired). Do no harm: with nothing
qualifying, the profile turns steering off and `run` says so.
"""
from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__, align, tasks
from .gguf_check import identity
from .plan import Settings, candidate_settings, is_dense
from .policy import LATE, NEAR_SHARE_V1, POLICY_VERSION, VANILLA, Policy, candidates, near_share
from .profile import Profile, cache_dir, key, write
from .quality import judge

# answer tokens per kind: a chat model restates the question first: a KV record's key before its
# value (two UUIDs, ~50 tokens on SmolLM2's vocabulary: at 32 every answer was cut before the
# value), a bulletin's scheme, district and year before the figure (at 32 some were cut there)
MAX_TOKENS = {"kv": 80, "bulletin": 48, "prose": 48}
BUDGET_MINUTES = 30.0
MAX_BUDGET = 100_000.0  # minutes (~70 days): far past MAX_ITEMS on any machine, and finite in seconds
MIN_CTX = 2048          # lost in the middle needs length; and a middle needs neighbours
MIN_CHUNKS = 4           # a middle with a neighbour on each side
ALPHA = 0.10             # one-sided sign test against vanilla
SLOT_LOSS = 2            # a candidate may not lose this many items net at any one slot
MAX_ITEMS = 60           # per run of the log; the budget usually ends it first
MIN_ITEMS = 6            # the floor for a choice (the sign test alone passes 4 straight wins, p = 0.0625)
HAND = "hand-tuned"      # the uncalibrated defaults, measured for the table, not a candidate
SEED = 0


class CalibrationError(Exception):
    """Bad input or a setup calibrate cannot run: one line for the user."""


@dataclass
class Outcome:
    correct: int = 0
    n: int = 0
    degenerate: int = 0


def _conditions(near: float = NEAR_SHARE_V1, dense: bool = False) -> list[tuple[str, Settings]]:
    """(name, settings) in the order they run for one placement (Settings(): the hand-tuned
    defaults, on the engine without a profile); near: the model family's share (policy.near_share);
    dense: the model's candidates include the late layers (policy.candidates)."""
    keep = [(c.name, candidate_settings(c, near)) for c in candidates(dense) if c.order == "keep"]
    edges = [(c.name, candidate_settings(c, near)) for c in candidates(dense) if c.order == "edges"]
    return [(VANILLA.name, candidate_settings(VANILLA, near)), (HAND, Settings())] + keep + edges


def log_path(ident: dict, n_ctx: int, chat: bool = True) -> Path:
    return cache_dir() / "calibrate" / f"{key(ident)}-c{n_ctx}{'' if chat else '-plain'}-v{POLICY_VERSION}.jsonl"


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CalibrationError(f"cannot write to the cache folder {folder}: {e.strerror or e} "
                               "(set ENGRAM_LLAMA_CACHE to a writable folder)") from None


def _row_ok(row, head: dict) -> bool:
    """A placement's row as _run writes it, for an item and the conditions of this setup."""
    if not isinstance(row, dict):
        return False
    count = lambda v, lo, hi: type(v) is int and lo <= v <= hi  # noqa: E731  (bool is not a count)
    item, res, sec = row.get("item"), row.get("results"), row.get("seconds")
    return (count(item, 0, MAX_ITEMS - 1) and row.get("slot") in tasks.SLOTS and row.get("kind") in tasks.KINDS
            and count(row.get("n_chunks"), 1, 1 + _n_distractors(head.get("n_ctx", 0)))
            and count(row.get("prompt_tokens"), 0, 1 << 30)
            and type(sec) in (int, float) and math.isfinite(sec) and sec >= 0
            and isinstance(res, dict) and all(isinstance(res.get(c), dict) and isinstance(res[c].get("answer"), str)
                                              for c in head["conditions"]))


def _read_log(path: Path, head: dict) -> list[dict]:
    """The rows of an earlier run with the same setup; another setup's log is set aside."""
    if not path.exists():
        return []
    rows = []
    # bytes split at newlines alone: a crash may cut a line inside a character, and an answer's
    # text may hold U+2028, which str.splitlines would split
    data = path.read_bytes()
    lines = [x for x in data.split(b"\n") if x.strip()]
    try:
        first = json.loads(lines[0]) if lines else None
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
        first = None
    if first != head:
        path.rename(path.with_suffix(f".old-{int(time.time())}.jsonl"))
        return []
    bad = False
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # a line cut by a crash: that placement runs again
            bad = True
            continue
        if _row_ok(row, head):
            rows.append(row)
        else:  # an edited or foreign line: dropped, that placement runs again
            bad = True
    if bad or not lines[-1:] or not data.endswith(b"\n"):
        # rewritten whole (a temporary file renamed over it), so rows appended later stand alone
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in [head] + rows), encoding="utf-8")
        os.replace(tmp, path)
    return rows


def _fit_chunks(eng, task: tasks.Task, room: int) -> int:
    """How many chunks (gold included) fill the prompt up to `room` tokens, in the given order."""
    def n_tokens(n: int) -> int:
        chunks, _ = tasks.place(task, "middle", n)
        order = [c.id for c in chunks]
        text, _, q_char = align.render(chunks, order, task.question, eng.template, eng.llm.bos,
                                       eng.llm.eos, eng.answer_prefix, eng.think)
        return len(eng.llm.tokenize(text, [align.user_span(chunks, order, q_char, task.question)])[0])

    lo, hi = 1, len(task.distractors) + 1
    if n_tokens(lo) > room:
        return 0
    while lo < hi:  # the largest n that fits
        mid = (lo + hi + 1) // 2
        if n_tokens(mid) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def sign_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(at least `wins` of wins + losses fair coin flips)."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n if n else 1.0


def _paired(rows: list[dict], a: str, b: str) -> tuple[int, int, dict[str, int]]:
    """Items a wins and loses against b (an item's net over its placements: they are not
    independent, and a reordered prompt is the same one at every slot), and a's net per slot."""
    per_item: dict[int, int] = {}
    net: dict[str, int] = {s: 0 for s in tasks.SLOTS}
    for r in rows:
        x, y = r["results"][a]["verdict"] == "correct", r["results"][b]["verdict"] == "correct"
        per_item[r["item"]] = per_item.get(r["item"], 0) + int(x) - int(y)
        net[r["slot"]] += int(x) - int(y)
    wins = sum(v > 0 for v in per_item.values())
    losses = sum(v < 0 for v in per_item.values())
    return wins, losses, net


def _degenerate_pairs(rows: list[dict], a: str, b: str) -> tuple[int, int]:
    """Placements where a's answer is degenerate and b's is not, and the reverse. Paired by
    placement, not item: a test of harm errs towards finding it (the gain's test, by items, errs
    against finding a gain)."""
    more = fewer = 0
    for r in rows:
        x, y = r["results"][a]["verdict"] == "degenerate", r["results"][b]["verdict"] == "degenerate"
        more += x and not y
        fewer += y and not x
    return more, fewer


def _dense(rows: list[dict]) -> bool:
    """Whether the log's rows ran a dense model's candidates (the late layers among them)."""
    return bool(rows) and LATE.name in rows[0]["results"]


def table(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, _ in _conditions(dense=_dense(rows)):
        t = {s: [0, 0] for s in tasks.SLOTS}
        deg = 0
        for r in rows:
            v = r["results"][name]["verdict"]
            t[r["slot"]][0] += v == "correct"
            t[r["slot"]][1] += 1
            deg += v == "degenerate"
        out[name] = {**t, "correct": sum(c for c, _ in t.values()), "n": len(rows), "degenerate": deg}
    return out


def qualifies(rows: list[dict], name: str, ref: str = VANILLA.name) -> tuple[bool, str]:
    """The paired rule against the reference, and why not."""
    w, l, net = _paired(rows, name, ref)
    tab = table(rows)
    p = sign_p(w, l)
    if w <= l or p > ALPHA:
        return False, f"items +{w}/-{l} vs {ref}, p = {p:.2f}"
    if min(net.values()) <= -SLOT_LOSS:
        return False, f"loses {-min(net.values())} net at a slot"
    more, fewer = _degenerate_pairs(rows, name, ref)
    if more > fewer and sign_p(more, fewer) <= ALPHA:
        return False, (f"{tab[name]['degenerate']} degenerate answers vs {tab[ref]['degenerate']} "
                       f"(placements +{more}/-{fewer}, p = {sign_p(more, fewer):.2f})")
    return True, f"items +{w}/-{l} vs {ref}, p = {p:.3f}"


def choose(rows: list[dict], near: float = NEAR_SHARE_V1) -> tuple[Policy, dict]:
    """The profile's policy from the rows by the paired rule (module docstring), and the reasons;
    near: the share the candidates ran with, recorded in the policy."""
    tab = table(rows)
    why = {}
    ok = {}
    cands = candidates(_dense(rows))
    for c in cands:
        ok[c.name], why[c.name] = qualifies(rows, c.name)
    order = {c.name: i for i, c in enumerate(cands)}
    strength = {c.name: c.strength for c in cands}
    # the most correct answers; ties: the milder, then the earlier (chunk before sentences)
    best = lambda names: max(names, key=lambda n: (tab[n]["correct"], -strength[n], -order[n])) if names else None  # noqa: E731
    keep = best([c.name for c in cands if c.order == "keep" and ok[c.name]])
    edges = best([c.name for c in cands if c.order == "edges" and ok[c.name]])
    reorder = False
    if edges:
        if keep is None:
            reorder = True
        else:
            w, l, _ = _paired(rows, edges, keep)
            reorder = w >= l
            why[edges] += f"; against {keep}: items +{w}/-{l}"
    kc = next((c for c in cands if c.name == keep), None)
    ec = next((c for c in cands if c.name == edges), None)
    pol = Policy(steer=kc is not None, peak=kc.strength if kc else 0.0, focus=kc.focus if kc else "chunk",
                 reorder=reorder, edges=ec.strength if (ec and reorder) else 0.0, near=near,
                 layers=kc.layers if kc else "default")
    return pol, {"given_order": keep or VANILLA.name, "retrieved": (edges if reorder else keep or VANILLA.name),
                 "why": why}


def _n_distractors(n_ctx: int) -> int:
    """Distractors generated per item: more than -c tokens hold (the prompt is filled to fit)."""
    return max(80, n_ctx // 40)


def task_items(n_ctx: int, seed: int = SEED) -> list[tasks.Task]:
    """The calibration's items in the order it runs them: the kinds in turn, enough distractors
    to fill n_ctx."""
    per_kind = MAX_ITEMS // len(tasks.KINDS) + 1
    pool = {k: tasks.generate(k, per_kind, seed, n_distractors=_n_distractors(n_ctx)) for k in tasks.KINDS}
    return [pool[tasks.KINDS[i % len(tasks.KINDS)]][i // len(tasks.KINDS)] for i in range(MAX_ITEMS)]


def decide(rows: list[dict], items: list[tasks.Task], ident: dict, head: dict) -> Profile:
    """The profile from a log's rows: every answer judged again by this version's judge, the
    paired rule, and how it was measured."""
    rows = _rejudge(rows, items)
    pol, chosen = choose(rows, head.get("near_share", NEAR_SHARE_V1))  # logs before the field: V1
    measured = {
        "n_ctx": head["n_ctx"], "prompt_tokens": [min(r["prompt_tokens"] for r in rows), max(r["prompt_tokens"] for r in rows)],
        "kinds": sorted({r["kind"] for r in rows}), "items": len({r["item"] for r in rows}), "placements": len(rows),
        "slots": list(tasks.SLOTS), "max_tokens": head["max_tokens"], "chat": head["chat"],
        "minutes": round(sum(r["seconds"] for r in rows) / 60, 1), "seed": head["seed"],
        "rule": f"items' sign test vs vanilla, one-sided p <= {ALPHA}; no slot {SLOT_LOSS}+ answers "
                "behind; not significantly more degenerate answers than vanilla (placements' sign test, "
                f"p <= {ALPHA}); ties: the milder",
        "table": table(rows), "chosen": chosen, "date": time.strftime("%Y-%m-%d"),
    }
    return Profile(pol, ident, measured, __version__)


def _rejudge(rows: list[dict], items: list[tasks.Task]) -> list[dict]:
    """The rows with every answer judged again on its documents (rebuilt from the seeded task, the
    slot and the chunk count the row records)."""
    out = []
    for r in rows:
        chunks, _ = tasks.place(items[r["item"]], r["slot"], r["n_chunks"])
        docs = "\n".join(c.text for c in chunks)
        task = items[r["item"]]
        res = {k: {**v, "verdict": judge(v["answer"], task.answers, docs, task.question)}
               for k, v in r["results"].items()}
        out.append({**r, "results": res})
    return out


def _probe_seconds(eng, n_tokens: int) -> float:
    """A rough time for one item, before the first has run: a 256-token prefill timed, scaled to
    four prefills of the prompt (attention's growth with length as SmolLM2 shows it: ~1 + n/8192)
    and the answers (question and answer tokens one at a time: ~4 prefill tokens' time each)."""
    toks = eng.llm.tokenize("The district administration released the funds. " * 40)[0][:256]
    eng.cache.prefill(toks[:16])  # warm-up: graph and (with -ngl) device setup are not the model's speed
    eng.llm.clear()
    t0 = time.perf_counter()
    eng.cache.prefill(toks)
    per_tok = (time.perf_counter() - t0) / max(len(toks), 1)
    prefill = n_tokens * per_tok * (1 + n_tokens / 8192)
    answers = len(tasks.SLOTS) * len(_conditions(dense=is_dense(eng.hook.kinds))) * 40 * 4 * per_tok
    return 4 * prefill + answers


def check_setup(n_ctx: int, budget_minutes: float) -> None:
    """The numbers alone, before any file is read or fetched."""
    if not (math.isfinite(budget_minutes) and 0 < budget_minutes <= MAX_BUDGET):
        raise CalibrationError(f"invalid --budget {budget_minutes:g}: minutes, more than 0 and at most {MAX_BUDGET:g}")
    if n_ctx < MIN_CTX:
        raise CalibrationError(f"-c {n_ctx} is too small for the calibration tasks: at least {MIN_CTX} tokens")


def run(model_path: str, n_ctx: int = 4096, budget_minutes: float = BUDGET_MINUTES, n_gpu_layers: int = 0,
        n_threads: int | None = None, chat: bool = True, progress: bool = True, log=None) -> tuple[Profile, Path]:
    """Calibrate, write the profile to the cache folder and return it with its path.
    CalibrationError for a setup that cannot run (one line)."""
    from .runtime import EngramLlama, trained_context

    say = log or (lambda m: print(f"engram-llama: {m}", file=sys.stderr))
    check_setup(n_ctx, budget_minutes)
    ident = identity(model_path)  # ModelFileError for a missing, non-GGUF or truncated file
    try:
        n_train = trained_context(model_path)
    except RuntimeError as e:
        raise CalibrationError(f"llama.cpp could not load {model_path}: {e}") from None
    if 0 < n_train < n_ctx:
        raise CalibrationError(f"-c {n_ctx} is more than the model's trained context ({n_train})")
    logf = log_path(ident, n_ctx, chat)
    _writable(logf.parent)
    _writable(cache_dir() / "profiles")

    try:
        eng = EngramLlama(model_path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, chat=chat,
                          profile=None)
    except (ValueError, RuntimeError) as e:
        raise CalibrationError(f"llama.cpp could not load {model_path}: {e}") from None
    try:
        return _run(eng, ident, n_ctx, budget_minutes, chat, progress, logf, say)
    finally:
        eng.close()


def _run(eng, ident, n_ctx, budget_minutes, chat, progress, logf, say):
    room = n_ctx - max(MAX_TOKENS.values()) - 16
    items = task_items(n_ctx)
    dense = is_dense(eng.hook.kinds)
    near = near_share(dense)
    head = {"model": key(ident), "n_ctx": n_ctx, "chat": chat, "seed": SEED, "max_tokens": MAX_TOKENS,
            "conditions": [n for n, _ in _conditions(dense=dense)], "policy_version": POLICY_VERSION,
            "tasks_version": tasks.VERSION, "near_share": near}
    rows = _read_log(logf, head)
    if not rows:
        logf.write_text(json.dumps(head) + "\n", encoding="utf-8")
    done = {(r["item"], r["slot"]) for r in rows}
    spent = sum(r["seconds"] for r in rows)
    budget = budget_minutes * 60
    n_chunks = min(_fit_chunks(eng, t, room) for t in items[:len(tasks.KINDS)])
    if n_chunks < MIN_CHUNKS:
        raise CalibrationError(f"-c {n_ctx} holds only {n_chunks} of the calibration chunks: at least {MIN_CHUNKS} "
                               f"needed, raise -c")
    est = _probe_seconds(eng, room) if not rows else None
    if est is not None and est * MIN_ITEMS > budget:
        raise CalibrationError(f"--budget {budget_minutes:g} min is too small: a profile needs {MIN_ITEMS} items, "
                               f"~{est * MIN_ITEMS / 60:.1f} min at -c {n_ctx} on this machine")
    if rows:
        say(f"resuming {logf.name}: {len(rows)} placements done, {spent / 60:.1f} of {budget_minutes:g} min spent")
    conditions = _conditions(near, dense)
    bar = None
    if progress:
        from tqdm import tqdm

        per_item = (spent / max(len({r['item'] for r in rows}), 1)) if rows else est
        bar = tqdm(total=max(1, min(MAX_ITEMS, int(budget / max(per_item, 1e-6)))) * len(tasks.SLOTS),
                   initial=len(rows), unit="placement", desc="calibrate", file=sys.stderr)
    per = collections.Counter(r["item"] for r in rows)
    n_items_done = sum(n == len(tasks.SLOTS) for n in per.values())
    try:
        for i, task in enumerate(items):
            if all((i, s) in done for s in tasks.SLOTS):
                continue
            per_item = spent / n_items_done if n_items_done else (est or 0)
            if n_items_done and spent + per_item > budget:
                break
            n = _fit_chunks(eng, task, room)
            for slot in tasks.SLOTS:
                if (i, slot) in done:
                    continue
                t0 = time.perf_counter()
                chunks, g = tasks.place(task, slot, n)
                docs = "\n".join(c.text for c in chunks)
                results, n_tok = {}, 0
                for name, s in conditions:
                    ans = eng.ask(task.question, chunks, max_tokens=MAX_TOKENS[task.kind], settings=s,
                                  answer_prefix=task.answer_prefix)
                    n_tok = ans.n_prompt_tokens
                    results[name] = {"answer": ans.text, "verdict": judge(ans.text, task.answers, docs, task.question)}
                row = {"item": i, "kind": task.kind, "slot": slot, "n_chunks": n, "prompt_tokens": n_tok,
                       "seconds": round(time.perf_counter() - t0, 2), "results": results}
                with open(logf, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                rows.append(row)
                spent += row["seconds"]
                if bar is not None:
                    bar.update(1)
            n_items_done += 1
            if bar is not None:
                bar.total = max(bar.n, min(MAX_ITEMS, int(budget / (spent / n_items_done))) * len(tasks.SLOTS))
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    # whole items only: a run stopped inside one (Ctrl-C, then a resume out of budget) keeps those rows
    # in its log for a later run, but the choice and its table see complete items
    per = collections.Counter(r["item"] for r in rows)
    rows = [r for r in rows if per[r["item"]] == len(tasks.SLOTS)]
    n_done = len({r["item"] for r in rows})
    if n_done < MIN_ITEMS:
        raise CalibrationError(f"the budget allowed {n_done} items; a profile needs {MIN_ITEMS}: raise --budget "
                               f"(what is done is kept; no profile written)")
    prof = decide(rows, items, ident, head)
    path = write(prof, cache_dir() / "profiles" / f"{key(ident)}.json")
    prof.path = path
    return prof, path


def report(prof: Profile) -> str:
    """The table calibrate prints: accuracy per slot, degenerate answers, and the choice."""
    m = prof.measured
    lines = [f"calibrated on {m['placements']} placements ({m['items']} items: {', '.join(m['kinds'])}), "
             f"{m['prompt_tokens'][0]}-{m['prompt_tokens'][1]} prompt tokens, {m['minutes']} min",
             "", "| candidate | first | middle | last | all | degenerate | vs vanilla |", "|---|---|---|---|---|---|---|"]
    for name, t in m["table"].items():
        cells = [f"{100 * c / n:.0f}%" if n else "-" for c, n in (t[s] for s in tasks.SLOTS)]
        why = m["chosen"]["why"].get(name, "")
        lines.append(f"| {name} | {' | '.join(cells)} | {100 * t['correct'] / t['n']:.0f}% | {t['degenerate']} | {why} |")
    lines += ["", f"policy: {prof.policy.label}"]
    if not (prof.policy.steer or prof.policy.reorder):
        lines.append("no candidate beat vanilla by the rule: steering is off for this model")
    return "\n".join(lines)
