"""The research entry point: accuracy runs through the product's `ask`, their reports, the options
that left the user CLI, and the generated models.

    python -m research run --preset main --n 40 --passages 30 --out results/nq-smollm2-30p.jsonl
    python -m research report results/nq-smollm2-30p.jsonl
    python -m research targets results/sealed-nq-gemma3-270m-30p.jsonl       # issue 27's targets
    python -m research misses results/nq-smollm2-30p.jsonl
    python -m research pooled A.jsonl B.jsonl --condition engram --against vanilla --slot all
    python -m research ask MODEL.gguf --chunks DOCS "question" --reread first   # every setting
    python -m research model qwen35 [--quant q8_0]                                # a generated GGUF

Conditions are Settings overrides and presets name lists of them, in research/presets.json.
Runs are resumable: rows already written are not run again.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from engram_llama.quality import degenerate  # noqa: E402
from .evaluate import judge, load_presets, miss_kind, run  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DATASETS = {"nq": DATA / "nq-open-dev.jsonl.gz", "kv": DATA / "kv-retrieval-75-dev.jsonl.gz", "domain": None,
            "bulletin": None}
SEALED = Path(__file__).resolve().parent / "sealed.json"  # the split declared in docs/EVAL.md (issue 27)


def wilson(k, n, z=1.96):
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def mcnemar(b, c):
    """Exact two-sided McNemar p-value from the discordant counts."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def fmt_p(p):
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def load_rows(path):
    """Result rows, judged again with the current judge and degenerate-answer checks (so a fix to
    either applies to rows already run). The recital check needs the documents, which rows do not
    keep: a stored recital stands. Rows run before the checks existed (no "degenerate" key), or
    before rows kept their gold answers (no "answers"), are left as they were reported."""
    rows = [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    for r in rows:
        if "answers" not in r:
            continue
        r["judge"] = judge(r["answer"], r["answers"])
        if r["slot"] != "gold-only" and "degenerate" in r:
            r["degenerate"] = (degenerate(r["answer"], None, r["answers"], r.get("question", ""))
                               or (r.get("degenerate") if r.get("degenerate") == "recital" else None))
    return rows


def verdict(r) -> str:
    """A row's verdict: a loop, stutter or recited chunk fails even when it holds the answer."""
    return "degenerate" if r.get("degenerate") else r["judge"]


def verdicts(path, answerable=False):
    """(rows, {(condition, slot): {item: verdict}}), "all" pooling the slots by (item, slot);
    answerable: only the items the model answered from the gold passage alone (their gold-only rows)."""
    rows = load_rows(path)
    ok = {r["id"] for r in rows if r["slot"] == "gold-only" and r["judge"] == "correct"}
    rows = [r for r in rows if r["slot"] != "gold-only" and (not answerable or r["id"] in ok)]
    res = {}
    for r in rows:
        v = verdict(r)
        res.setdefault((r["condition"], r["slot"]), {})[r["id"]] = v
        # every slot pooled, paired by (item, slot): the overall comparison with more power
        res.setdefault((r["condition"], "all"), {})[(r["id"], r["slot"])] = v
    return rows, res


def paired(res, a, b, slot):
    """(wins, losses) of condition a against b at one slot, over the items both answered."""
    x, y = res.get((a, slot), {}), res.get((b, slot), {})
    both = [i for i in x if i in y]
    return (sum(x[i] == "correct" and y[i] != "correct" for i in both),
            sum(x[i] != "correct" and y[i] == "correct" for i in both))


def pooled_p(res, a, b) -> float:
    """The p of a against b over every slot: an item's slots are not independent pairs (reordering's
    prompt is one at every slot), so each item counts once, by its net over its slots (a sign test)."""
    return mcnemar(*item_net(res.get((a, "all"), {}), res.get((b, "all"), {})))


def item_net(x: dict, y: dict) -> tuple[int, int]:
    """Items ahead and behind: x and y map (item, slot) -> verdict; each item's wins less its losses."""
    net: dict = {}
    for k in x:
        if k in y:
            net[k[0]] = net.get(k[0], 0) + (x[k] == "correct") - (y[k] == "correct")
    return sum(v > 0 for v in net.values()), sum(v < 0 for v in net.values())


def _acc(res, c, s):
    d = res.get((c, s), {})
    return 100 * sum(v == "correct" for v in d.values()) / max(len(d), 1)


SLOTS = ("first", "middle", "last")


def targets(path, answerable=False, cond="calibrated"):
    """Issue 27's five targets for one sealed-split file, as docs/EVAL.md section 2 defines them;
    returns the number missed."""
    rows, res = verdicts(path, answerable)
    acc = {(c, s): _acc(res, c, s) for (c, s) in res}
    checks = []
    vs_hand = {s: paired(res, cond, "engram", s) for s in SLOTS}
    # the slot nearest a significant loss: behind, with the smallest p (else the largest net loss)
    worst_loss = min(SLOTS, key=lambda s: (vs_hand[s][1] <= vs_hand[s][0], mcnemar(*vs_hand[s]),
                                           vs_hand[s][0] - vs_hand[s][1]))
    w, l = vs_hand[worst_loss]
    checks.append(("no significant loss to the hand-tuned defaults at any slot",
                   not any(l_ > w_ and mcnemar(w_, l_) < 0.05 for w_, l_ in vs_hand.values()),
                   f"worst slot {worst_loss}: +{w}/-{l}, p {fmt_p(mcnemar(w, l))}"))
    gain = acc[(cond, "middle")] - acc[("vanilla", "middle")]
    checks.append(("middle slot >= vanilla's + 15 points", gain >= 15,
                   f"{acc[(cond, 'middle')]:.0f}% vs {acc[('vanilla', 'middle')]:.0f}% ({gain:+.0f})"))
    worst, best = min(acc[(cond, s)] for s in SLOTS), max(acc[("vanilla", s)] for s in SLOTS)
    checks.append(("worst slot >= vanilla's best slot", worst >= best, f"{worst:.0f}% vs {best:.0f}%"))
    w, l = paired(res, cond, "reorder", "all")
    checks.append(("ahead of reordering, paired by item and slot", w > l,
                   f"+{w}/-{l}, p {fmt_p(pooled_p(res, cond, 'reorder'))} (items by their net)"))
    deg = {c: sum(v == "degenerate" for v in res.get((c, "all"), {}).values()) for c in (cond, "vanilla")}
    why = {c: collections.Counter(r["degenerate"] for r in rows if r["condition"] == c and r.get("degenerate"))
           for c in (cond, "vanilla")}
    kinds = ", ".join(f"{k} {why[cond][k]}/{why['vanilla'][k]}" for k in sorted(set(why[cond]) | set(why["vanilla"])))
    checks.append(("no more degenerate answers than vanilla", deg[cond] <= deg["vanilla"],
                   f"{deg[cond]} vs {deg['vanilla']}" + (f" ({kinds})" if kinds else "")))
    n = len({i for i in res.get((cond, "first"), {})})
    print(f"{path}{' (answerable)' if answerable else ''}: {n} items, {cond}\n")
    print("| target | met | measured |\n|---|---|---|")
    for name, met, how in checks:
        print(f"| {name} | {'yes' if met else 'NO'} | {how} |")
    # relevance bounds steering: the bias goes to the best-ranked chunk
    ranked = [r for r in rows if r["condition"] == cond and "gold_rank" in r]
    if ranked:
        top = [r for r in ranked if r["gold_rank"] == 0]
        hit = lambda rs: 100 * sum(res[(cond, r["slot"])][r["id"]] == "correct" for r in rs) / max(len(rs), 1)
        print(f"\ngold chunk ranked first in {100 * len(top) / len(ranked):.0f}% of {len(ranked)} prompts; "
              f"{cond} correct on {hit(top):.0f}% of those, {hit([r for r in ranked if r['gold_rank'] != 0]):.0f}% "
              "of the rest")
    return sum(not met for _, met, _ in checks)


def report(path, against="vanilla", answerable=False):
    """Accuracy per condition and slot, paired against one condition (McNemar); answerable: only
    the items the model answered from the gold passage alone (their gold-only rows)."""
    rows, res = verdicts(path, answerable)
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    slots = [s for s in ("first", "middle", "last", "all") if any(k[1] == s for k in res)]
    if not rows:
        sys.exit(f"eval report: {path} has no answers in context yet (only the closed-book gold-only checks)")
    n_tok = sorted(r["n_tokens"] for r in rows)
    print(f"{path}: {len({r['id'] for r in rows})} items, prompts {n_tok[0]}-{n_tok[-1]} tokens\n")
    print("(all: the slots pooled, paired by item and slot; its p counts each item once, by its net over the\n"
          " slots; reordering's prompt is the same at every slot, so two reordering conditions are compared on one slot)\n")
    print(f"| condition | slot | n | correct | 95% CI | wrong | refusal | degenerate | vs {against} (+/-) | McNemar p |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in conds:
        for s in slots:
            d = res.get((c, s), {})
            n = len(d)
            k = sum(v == "correct" for v in d.values())
            lo, hi = wilson(k, n)
            wr = sum(v == "wrong" for v in d.values())
            rf = sum(v == "refusal" for v in d.values())
            dg = sum(v == "degenerate" for v in d.values())
            base = res.get((against, s), {})
            b, cc = paired(res, c, against, s)
            same_prompt = s == "all" and one_prompt(c, against)
            vs = f"+{b}/-{cc}" if c != against and base and not same_prompt else ""
            p = (fmt_p(pooled_p(res, c, against) if s == "all" else mcnemar(b, cc))
                 if c != against and base and not same_prompt else "")
            print(f"| {c} | {s} | {n} | {100 * k / max(n, 1):.0f}% | {100 * lo:.0f}-{100 * hi:.0f}% | {wr} | {rf} | {dg} | {vs} | {p} |")


def misses(path):
    """The wrong answers by kind (evaluate.miss_kind), per condition and slot."""

    rows = [r for r in load_rows(path) if r["slot"] != "gold-only"]
    tally = {}
    for r in rows:
        t = tally.setdefault((r["condition"], r["slot"]), {"n": 0, "correct": 0, "degenerate": 0, "refusal": 0,
                                                           "echo": 0, "near": 0, "other": 0})
        t["n"] += 1
        v = verdict(r)
        kind = v if v != "wrong" else miss_kind(r["answer"], r["answers"], r["question"])
        t[kind] += 1
    print(f"{path}: answers by kind (echo: repeats >= 16 characters of the question, a KV key copied; near: "
          f"a garbled copy of the gold answer)\n")
    print("| condition | slot | n | correct | degenerate | refusal | echo | near | other |\n|---|---|---|---|---|---|---|---|---|")
    slots = ("first", "middle", "last")
    for c in dict.fromkeys(r["condition"] for r in rows):
        for s in slots:
            if (c, s) in tally:
                t = tally[(c, s)]
                print(f"| {c} | {s} | {t['n']} | {t['correct']} | {t['degenerate']} | {t['refusal']} | {t['echo']} | "
                      f"{t['near']} | {t['other']} |")


def one_prompt(a, b):
    """Two reordering conditions see one prompt at every slot: pooling the slots would count it 3 times."""
    return a.startswith("reorder") and b.startswith("reorder")


def pooled(paths, condition, against, slot="first", exclude=()):
    """One condition against another over several files (models, lengths), paired by file and item
    at one slot ("all": every slot, paired by item and slot): the test across runs that each alone
    are too small. `exclude`: result files whose items are left out (where a setting was chosen, so
    the rest is its held-out test)."""
    if slot == "all" and one_prompt(condition, against):
        sys.exit("eval pooled: two reordering conditions see one prompt at every slot; give --slot first")
    skip = {r["id"] for f in exclude for r in load_rows(f)}
    print(f"{condition} against {against}, slot {slot}" + (f", leaving out the {len(skip)} items of "
                                                           f"{', '.join(exclude)}" if skip else "") + "\n")
    print(f"| file | n | {against} | {condition} | +/- | McNemar p |")
    print("|---|---|---|---|---|---|")
    def tally(ids, a, c):  # n, base correct, cond correct, gained, lost, items ahead, items behind
        good = lambda d: {i: "correct" if d[i] else "no" for i in ids}  # noqa: E731
        return [len(ids), sum(a[i] for i in ids), sum(c[i] for i in ids),
                sum(c[i] and not a[i] for i in ids), sum(a[i] and not c[i] for i in ids), *item_net(good(c), good(a))]

    def line(name, t):  # p: each item once, by its net over the slots (pooled_p)
        n = max(t[0], 1)
        p = mcnemar(t[5], t[6])
        ptxt = fmt_p(p)
        print(f"| {name} | {t[0]} | {100 * t[1] / n:.0f}% | {100 * t[2] / n:.0f}% | +{t[3]}/-{t[4]} | {ptxt} |")

    tot, first, lower = [0] * 7, [0] * 7, [0] * 7
    for path in paths:
        res, top = {}, {}
        for r in load_rows(path):
            if slot in (r["slot"], "all") and r["slot"] != "gold-only" and r["condition"] in (condition, against) \
                    and r["id"] not in skip:
                key = (r["id"], r["slot"])
                res.setdefault(r["condition"], {})[key] = verdict(r) == "correct"
                if r["condition"] == against:
                    top[key] = r.get("gold_rank") == 0
        a, c = res.get(against, {}), res.get(condition, {})
        ids = [i for i in c if i in a]
        row = tally(ids, a, c)
        tot = [x + y for x, y in zip(tot, row)]
        first = [x + y for x, y in zip(first, tally([i for i in ids if top[i]], a, c))]
        lower = [x + y for x, y in zip(lower, tally([i for i in ids if not top[i]], a, c))]
        line(Path(path).name, row)
    line("**all**", tot)
    # where the difference comes from: prompts whose gold the pipeline ranked first, or lower
    line("all, gold ranked first", first)
    line("all, gold ranked lower", lower)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ask"]:  # the CLI's `run`, with every setting of the schema
        from engram_llama.cli import main as cli_main

        return cli_main(["run"] + argv[1:], research=True)
    conds, presets = load_presets()
    ap = argparse.ArgumentParser(prog="python -m research", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run conditions on a data set (resumable)")
    r.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct)")
    r.add_argument("--out", required=True)
    r.add_argument("--preset", choices=list(presets), default="main")
    r.add_argument("--conditions", default=None, help="condition names, comma-separated (instead of --preset)")
    r.add_argument("--dataset", choices=list(DATASETS), default="nq")
    r.add_argument("--data", default=None, help="the data file (default: ../shared/data's for the data set)")
    r.add_argument("--n", type=int, default=40, help="items (with --sealed: as many of the split's, in its seeded order)")
    r.add_argument("--passages", type=int, default=15)
    r.add_argument("--slots", default="first,middle,last", help="gold slots, comma-separated")
    r.add_argument("--ids", default=None, help="only these item ids, comma-separated")
    r.add_argument("--skip", type=int, default=0, help="leave out the first N items of the seeded order")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-filter", action="store_true", help="keep items the model cannot answer from the gold alone")
    r.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context size (default: the model's trained context, at most the CLI's --max-ctx default)")
    r.add_argument("-t", "--threads", type=int, default=None)
    r.add_argument("--no-chat", action="store_true", help="plain prompt with an answer prefix (base models)")
    r.add_argument("--restate-key", action="store_true", help="KV: the answer starts by restating the record's key")
    r.add_argument("--kv-records", type=int, default=1, metavar="N",
                   help="KV: N records to a passage (calibrate's task has 4; the sealed split 1)")
    r.add_argument("--max-new", type=int, default=None, help="answer tokens (default: evaluate.MAX_NEW for the set, else 16)")
    r.add_argument("--profile", default=None, help="a calibrated profile for the conditions marked \"profile\"")
    r.add_argument("--sealed", action="store_true", help="the sealed split's items (research/sealed.json): run it "
                   "once, choose nothing on it; with --no-filter the gold-only answers are still recorded")
    r.add_argument("--split", default=None, metavar="FILE[:KEY]", help="another declared split, as --sealed: "
                   "FILE's list KEY (default: the data set's name) of item ids, or its bulletin_seed")
    p = sub.add_parser("report", help="accuracy per condition and slot, paired against one condition")
    p.add_argument("path")
    p.add_argument("--against", default="vanilla")
    p.add_argument("--answerable", action="store_true", help="only the items answered from the gold passage alone")
    t = sub.add_parser("targets", help="issue 27's targets on a sealed-split file (docs/EVAL.md section 2)")
    t.add_argument("path")
    t.add_argument("--answerable", action="store_true", help="only the items answered from the gold passage alone")
    t.add_argument("--condition", default="calibrated", help="the condition held to the targets")
    m = sub.add_parser("misses", help="the wrong answers by kind (echo, near, other)")
    m.add_argument("path")
    po = sub.add_parser("pooled", help="one condition against another over several files")
    po.add_argument("paths", nargs="+")
    po.add_argument("--condition", required=True)
    po.add_argument("--against", required=True)
    po.add_argument("--slot", default="first", choices=["first", "middle", "last", "all"])
    po.add_argument("--exclude", nargs="*", default=[], help="result files whose items are left out")
    g = sub.add_parser("model", help="write (or find) a generated random-weight GGUF: qwen35, gemma3, llama, qwen35-chat, qwen35-2b")
    g.add_argument("name")
    g.add_argument("--quant", default=None)
    sub.add_parser("ask", help="engram-llama run with every setting, the research-only ones too")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        from engram_llama.cli import default_model

        names = args.conditions.split(",") if args.conditions else presets[args.preset]
        unknown = [n for n in names if n not in conds]
        if unknown:
            sys.exit(f"research: unknown conditions {unknown}; known: {', '.join(conds)}")
        data = args.data or DATASETS[args.dataset]
        only = set(args.ids.split(",")) if args.ids else None
        if args.sealed and args.split:
            sys.exit("research: --sealed or --split, not both")
        if args.max_new is not None and args.max_new < 1:
            sys.exit("research: --max-new must be at least 1")
        if args.sealed or args.split:
            if args.ids or args.skip:
                sys.exit("research: a split runs its own items: no --ids or --skip with it")
            path, _, key = (args.split or str(SEALED)).partition(":")
            try:
                split = json.loads(Path(path).read_text())
            except (OSError, ValueError) as e:
                sys.exit(f"research: cannot read the split {path}: {e}")
            if not isinstance(split, dict):
                sys.exit(f"research: the split {path} is not a JSON object")
            if args.dataset == "bulletin" and key:
                sys.exit("research: a split's bulletins are its bulletin_seed: no :KEY with them")
            key = key or args.dataset
            if args.dataset in ("nq", "kv") and isinstance(split.get(key), list) and split[key]:
                only = set(split[key])
            elif args.dataset == "bulletin" and isinstance(split.get("bulletin_seed"), int):
                args.seed = split["bulletin_seed"]
            else:
                sys.exit(f"research: the split {path} has no {key} items")
        try:
            run(args.model or default_model(), args.out, {n: conds[n] for n in names}, n_items=args.n,
                n_passages=args.passages, slots=tuple(args.slots.split(",")), data=str(data) if data else None,
                n_ctx=args.ctx_size, answerable_only=not args.no_filter, seed=args.seed, chat=not args.no_chat,
                dataset=args.dataset, restate_key=args.restate_key, kv_records=args.kv_records, n_threads=args.threads, skip=args.skip,
                only=only, profile=args.profile, record_gold=bool(args.sealed or args.split), max_new=args.max_new)
        except (ValueError, OSError) as e:
            sys.exit(f"research: {e}")
        except Exception as e:  # the CLI's UsageError (no default model), a model llama.cpp refuses
            sys.exit(f"research: {type(e).__name__}: {e}".splitlines()[0])
    elif args.cmd == "report":
        report(args.path, args.against, args.answerable)
    elif args.cmd == "targets":
        return 1 if targets(args.path, args.answerable, args.condition) else 0
    elif args.cmd == "misses":
        misses(args.path)
    elif args.cmd == "pooled":
        pooled(args.paths, args.condition, args.against, args.slot, args.exclude)
    elif args.cmd == "model":
        from . import synth

        print(synth.cached_model(args.name, quant=args.quant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
