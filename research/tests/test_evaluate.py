"""Scoring and statistics of the evaluation harness."""
import json
import sys
from pathlib import Path

import pytest

from research import eval as ev
from research.datasets import hard_distractors, normalize
from research.evaluate import judge

ROOT = Path(__file__).resolve().parents[2]


def test_normalize_like_lost_in_the_middle():
    assert normalize("The  Wilhelm Conrad Röntgen!") == "wilhelm conrad röntgen"
    assert normalize("an apple, a pear") == "apple pear"


@pytest.mark.parametrize("out,want", [
    ("It was Wilhelm Conrad Röntgen in 1901.", "correct"),
    ("röntgen", "wrong"),  # a part of the answer is not the answer
    ("I don't know.", "refusal"),
    ("The documents do not mention who won.", "refusal"),
    ("The passage doesn't specify.", "refusal"),
    ("The information is not provided in the documents.", "refusal"),
    ("There is no information about that.", "refusal"),
    ("", "refusal"),
    ("Albert Einstein", "wrong"),
])
def test_judge(out, want):
    assert judge(out, ["Wilhelm Conrad Röntgen"]) == want


def test_hard_distractors_exclude_answer_passages():
    items = [
        {"id": "a", "question": "who discovered x-rays", "answers": ["Röntgen"],
         "gold": {"title": "X-ray", "text": "X-rays were discovered by Röntgen in 1895."}},
        {"id": "b", "question": "capital of france", "answers": ["Paris"],
         "gold": {"title": "Paris", "text": "Paris is the capital of France."}},
        {"id": "c", "question": "x-rays uses", "answers": ["imaging"],
         "gold": {"title": "X-ray uses", "text": "X-rays are used in medical imaging; Röntgen found them."}},
        {"id": "d", "question": "x-rays danger", "answers": ["radiation"],
         "gold": {"title": "X-ray safety", "text": "X-rays discovered long ago can harm tissue."}},
    ]
    d = hard_distractors(items, 2)
    # for "a", passage c contains its answer (Röntgen) and is dropped; d shares "x-rays discovered"
    assert "a" in d and 2 not in d["a"] and d["a"][0] == 3
    assert all(i not in picks for i, picks in zip(range(4), d.values()))


def test_wilson_and_mcnemar_hand_values():
    lo, hi = ev.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    # away from 1/2 the centre moves (Newcombe 1998, table I: 1/10 and 0/10, Wilson's score interval)
    assert ev.wilson(1, 10) == pytest.approx((0.0179, 0.4042), abs=1e-4)
    assert ev.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert ev.mcnemar(0, 0) == 1.0
    assert ev.mcnemar(6, 0) == pytest.approx(2 / 64)
    assert ev.mcnemar(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)


@pytest.mark.parametrize("n_passages", [12, 36])  # 36: more than the five other years can vary (once hung)
def test_domain_set_is_seeded_and_hard(n_passages):
    from research import datasets

    a, b = datasets.domain(20, n_passages, seed=5), datasets.domain(20, n_passages, seed=5)
    assert a == b and a != datasets.domain(20, n_passages, seed=6)
    for it in a:
        assert len(it.distractors) == n_passages - 1
        assert len({d for _, d in it.distractors}) == n_passages - 1
        g = it.gold[1]
        assert all(x in g for x in it.answers[:1])  # the gold passage holds the answer
        for _, d in it.distractors:
            assert not any(x in d for x in it.answers)  # no distractor does
            assert d != g
        # most distractors share two of the gold's three keys (scheme, district, year)
        head = g.split(", the ")[0]  # "Under SCHEME"
        district = g.split("the ")[1].split(" district")[0]
        year = g.split(" crore in ")[1].split(" ")[0]
        two = [(head + "," in d) + (f"the {district} district" in d) + (f" crore in {year} " in d) == 2
               for _, d in it.distractors]
        assert sum(two) >= len(two) // 2


def test_kv_items(tmp_path):
    """KV items from a file in the shared data's format (written here: the tests do not need the
    shared data next to the checkout)."""
    import gzip
    import json

    from research import datasets

    recs = [[f"k{i:02d}-aaaa", f"v{i:02d}-bbbb"] for i in range(12)]
    path = tmp_path / "kv.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "kv-1", "ordered_kv_records": recs, "key": "k05-aaaa", "value": "v05-bbbb"}) + "\n")
    it = datasets.kv(path, 10)[0]
    assert it.question == 'What is the value of the key "k05-aaaa"?' and it.answers == ["v05-bbbb"]
    assert it.gold == ("record", '"k05-aaaa": "v05-bbbb"')
    # the other records in their order, the asked one left out, cut to n - 1
    assert [d[1] for d in it.distractors] == [f'"k{i:02d}-aaaa": "v{i:02d}-bbbb"' for i in range(12) if i != 5][:9]
    assert it.answer_prefix is None
    # restate_key: the answer starts as the gold record does, up to its value
    it = datasets.load("kv", 10, path, restate_key=True)[0]
    assert it.answer_prefix == 'Answer: "k05-aaaa": "' and it.gold[1].startswith(it.answer_prefix[len("Answer: "):])
    # 4 records to a passage, as calibrate's task: the gold record among the first 3 others at a
    # line drawn from the id, the rest in blocks of 4 in their order (8 left: two blocks), cut to n - 1
    it = datasets.load("kv", 2, path, kv_records=4)[0]
    rec = lambda i: f'"k{i:02d}-aaaa": "v{i:02d}-bbbb"'  # noqa: E731
    gold = it.gold[1].split("\n")
    assert sorted(gold) == sorted(rec(i) for i in (0, 1, 2, 5)) and [g for g in gold if g != rec(5)] == [rec(i) for i in (0, 1, 2)]
    assert gold == datasets.kv(path, 2, records=4)[0].gold[1].split("\n")  # the line is drawn alike every time
    assert [d[1] for d in it.distractors] == ["\n".join(rec(i) for i in (3, 4, 6, 7))]
    assert len(datasets.kv(path, 10, records=4)[0].distractors) == 2


def test_pooled_pairs_by_item_and_slot(tmp_path, capsys):
    """`pooled --slot all` pairs each prompt (item, slot) across two conditions and sums the files;
    the counts here are worked out by hand from the rows written."""
    def rows(path, table):  # table: (id, slot) -> (a correct, b correct)
        with open(path, "w") as f:
            for (i, slot), verdicts in table.items():
                for cond, ok in zip(("a", "b"), verdicts):
                    f.write(json.dumps({"id": i, "slot": slot, "condition": cond, "answer": "x" if ok else "y",
                                        "answers": ["x"], "gold_rank": 0}) + "\n")
            for cond, ok in (("a", False), ("b", True)):  # closed-book rows: never paired
                f.write(json.dumps({"id": "q1", "slot": "gold-only", "condition": cond, "answer": "x" if ok else "y",
                                    "answers": ["x"]}) + "\n")
    f1, f2 = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    rows(f1, {("q1", "first"): (0, 1), ("q1", "last"): (1, 1), ("q2", "first"): (1, 0), ("q2", "middle"): (0, 1)})
    rows(f2, {("q1", "first"): (0, 1), ("q3", "last"): (0, 0)})
    ev.pooled([str(f1), str(f2)], "b", "a", slot="all")
    out = capsys.readouterr().out
    assert "| one.jsonl | 4 | 50% | 75% | +2/-1 |" in out
    assert "| two.jsonl | 2 | 0% | 50% | +1/-0 |" in out
    # p: items by their net over their slots (q1 +1 and q2 0 in one, q1 +1 in two: 2 ahead, p = 0.5),
    # not the 4 placements as independent pairs (p = 0.625)
    assert "| **all** | 6 | 33% | 67% | +3/-1 | 0.500 |" in out
    ev.pooled([str(f1), str(f2)], "b", "a", slot="first")
    assert "| **all** | 3 | 33% | 67% | +2/-1 |" in capsys.readouterr().out
    # two reordering conditions share one prompt across slots: refused rather than counted three times
    with pytest.raises(SystemExit, match="one prompt at every slot"):
        ev.pooled([str(f1)], "reorder+engram s1 top1", "reorder", slot="all")


def test_resume_refuses_a_file_made_with_the_other_prompt(tmp_path):
    """A KV file written with the key restated is not resumed without it, nor the reverse: the
    rows record the prefix, and the check runs before any model is loaded."""
    import gzip

    from research import evaluate

    data = tmp_path / "kv.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "kv-1", "ordered_kv_records": [["k1", "v1"], ["k2", "v2"]], "key": "k1",
                            "value": "v1"}) + "\n")
    for restated, row in ((False, {"prefix": "key"}), (True, {})):
        out = tmp_path / f"out-{restated}.jsonl"
        out.write_text(json.dumps({"id": "kv-1", "slot": "gold-only", "condition": "vanilla", "answer": "v1",
                                   "judge": "correct", "answers": ["v1"], **row}) + "\n")
        with pytest.raises(ValueError, match="the key restated; resume it " + ("with" if not restated else "without")):
            evaluate.run("no-model.gguf", str(out), {"vanilla": {"engram": False}}, dataset="kv", data=str(data), n_passages=2, restate_key=restated)
    # likewise KV records to a passage, and N < 1 or with another set is refused
    out = tmp_path / "out-records.jsonl"
    out.write_text(json.dumps({"id": "kv-1", "slot": "gold-only", "condition": "vanilla", "answer": "v1",
                               "judge": "correct", "answers": ["v1"], "records": 4}) + "\n")
    with pytest.raises(ValueError, match="4 KV records to a passage, not 1"):
        evaluate.run("no-model.gguf", str(out), {"vanilla": {"engram": False}}, dataset="kv", data=str(data), n_passages=2)
    with pytest.raises(ValueError, match="at least 1"):
        evaluate.run("no-model.gguf", str(out), {"vanilla": {"engram": False}}, dataset="kv", data=str(data), n_passages=2, kv_records=0)
    with pytest.raises(ValueError, match="KV set only"):
        evaluate.run("no-model.gguf", str(out), {"vanilla": {"engram": False}}, dataset="nq", data=str(data), n_passages=2, kv_records=4)


def test_miss_kind_and_the_misses_report(tmp_path, capsys):
    """A KV key copied is an echo, a gold UUID with a piece repeated a near miss, a sentence other;
    the report tallies rows written here by hand."""
    from research.evaluate import miss_kind

    key, gold = "2a8d601d-1d69-4e64-9f90-8ad825a74195", "bb3ba2a5-7de8-434b-a86e-a88bb9fa7289"
    q = f'What is the value of the key "{key}"?'
    assert miss_kind(key + '"', [gold], q) == "echo"
    assert miss_kind(key[:14], [gold], q) == "other"  # 12 normalised characters: under ECHO_CHARS
    assert miss_kind("bb3ba2a5-7de8-7de8-434b-a86e-a88bb9fa7289", [gold], q) == "near"
    assert miss_kind("bb3ba2a5-0000-0000-0000-000000000000", [gold], q) == "other"
    assert miss_kind("The value of the key is 0.000", [gold], q) == "other"
    # a run shared with a gold answer is not an echo (the question quotes the answer's words)
    assert miss_kind("Lord of the Rings trilogy, by Tolkien", ["Peter Jackson's Lord of the Rings trilogy"],
                     "which films are the lord of the rings trilogy") == "other"
    assert miss_kind("Lord of the Rings trilogy, by Tolkien", ["Peter Jackson"],
                     "which films are the lord of the rings trilogy") == "echo"
    path = tmp_path / "r.jsonl"
    with open(path, "w") as f:
        for i, (slot, ans) in enumerate([("last", key), ("last", gold), ("last", "I don't know"), ("first", "x y z"),
                                         ("first", f"{gold} {gold} {gold}")]):   # a loop: degenerate, not correct
            f.write(json.dumps({"id": f"kv{i}", "slot": slot, "condition": "c", "answer": ans, "answers": [gold],
                                "question": q, "degenerate": None}) + "\n")
    ev.misses(str(path))
    out = capsys.readouterr().out
    assert "| c | first | 2 | 0 | 1 | 0 | 0 | 0 | 1 |" in out
    assert "| c | last | 3 | 1 | 0 | 1 | 1 | 0 | 0 |" in out


def test_presets_are_settings_overrides():
    """Every condition of presets.json is a valid Settings override, every preset names known ones,
    and the main preset is vanilla, the shipped defaults and reordering."""
    from engram_llama.plan import Settings
    from research.evaluate import load_presets

    conds, presets = load_presets()
    assert presets["main"] == ["vanilla", "engram", "reorder"]
    assert Settings(**conds["engram"]) == Settings()
    assert Settings(**conds["reorder"]) == Settings(engram=False, order="edges")


def test_a_candidate_condition_runs_with_the_share_it_names(tmp_path):
    """{"candidate": NAME} is calibrate's candidate at the old half share (the rows measured so);
    "near" gives another share; a field besides those is refused."""
    from engram_llama.plan import candidate_settings
    from engram_llama.policy import CANDIDATES
    from research.evaluate import load_presets, settings_of

    c4 = next(c for c in CANDIDATES if c.name == "chunk+4")
    assert settings_of({"candidate": "chunk+4"}, None) == candidate_settings(c4, 0.5)
    assert settings_of({"candidate": "chunk+4"}, None).near == 2.0
    assert settings_of({"candidate": "chunk+4", "near": 0.75}, None).near == 3.0
    for bad in ({"candidate": "chunk+4", "x": 1}, {"candidate": "chunk+4", "near": 5}, {"candidate": "chunk+9"}):
        f = tmp_path / "p.json"
        f.write_text(json.dumps({"conditions": {"c": bad}, "presets": {}}))
        with pytest.raises(ValueError):
            load_presets(f)


def test_the_declared_splits_are_disjoint_and_fresh():
    """The second held-out split's NQ items are in no sealed list and no development row, its two
    NQ lists do not overlap, and its bulletin seed is used by no other split or by calibration."""
    import glob
    import json

    from engram_llama import calibrate

    near = json.loads((ROOT / "research" / "heldout-near.json").read_text())
    sealed = json.loads((ROOT / "research" / "sealed.json").read_text())
    assert len(near["nq"]) == 100 and len(near["nq8k"]) == 40 and not set(near["nq"]) & set(near["nq8k"])
    assert not (set(near["nq"]) | set(near["nq8k"])) & set(sealed["nq"])
    assert near["bulletin_seed"] not in (sealed["bulletin_seed"], calibrate.SEED)
    rows = set()
    for f in glob.glob(str(ROOT / "docs" / "results" / "*.jsonl")):
        if Path(f).name.startswith("near-"):
            continue  # the split's own rows
        for line in open(f, encoding="utf-8"):
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and "id" in r:
                rows.add(str(r["id"]))
    assert not (set(near["nq"]) | set(near["nq8k"])) & rows
    data = ROOT.parent / "shared" / "data" / "nq-open-dev.jsonl.gz"
    if data.exists():  # the file positions the declaration names (500-999)
        from research.datasets import load_nq

        window = {it["id"] for it in load_nq(data)[500:1000]}
        assert set(near["nq"]) | set(near["nq8k"]) <= window


def test_documents_split_as_the_cli_splits_them():
    """The eval's chunks are chunks.split of the documents (as `run --chunks` reads them) and the
    gold's chunk ids follow the documents before it, a long passage cut in two."""
    from research.evaluate import chunked, documents

    class It:
        gold = ("Gold", "g " * 500)  # 1000 characters: two chunks
        distractors = [(f"D{i}", f"distractor {i}.") for i in range(5)]

    passages, k = documents(It, "middle", 4)
    assert k == 1 and [t for t, _ in passages] == ["D0", "Gold", "D1", "D2"]
    chunks, gold = chunked(passages, k)
    assert [c.source for c in chunks] == ["D0", "Gold", "Gold", "D1", "D2"] and gold == {1, 2}
    assert documents(It, "last", 4)[1] == 3 and documents(It, "first", 4)[1] == 0


DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "nq-open-dev.jsonl.gz"


@pytest.mark.parametrize("dataset", ["bulletin", "nq"])
def test_an_eval_row_is_what_the_cli_answers(tmp_path, dataset):
    """Item by item, with SmolLM2: the row the evaluation writes for a condition is the answer
    `engram-llama run MODEL --chunks DOCS.jsonl "question" --json -n 16` gives for the same documents
    in the same order (the CLI picking its own context size). Generated bulletins everywhere; real
    NQ items where ../shared/data sits beside the checkout."""
    import subprocess

    from conftest import smollm2_path
    from research import datasets, evaluate

    if dataset == "nq" and not DATA.exists():
        pytest.skip("needs ../shared/data beside the checkout")
    model = str(smollm2_path())
    out = tmp_path / "rows.jsonl"
    conds = {"vanilla": {"engram": False, "order": "keep"}, "engram": {}, "reorder": {"engram": False, "order": "edges"}}
    evaluate.run(model, str(out), conds, n_items=2, n_passages=6, slots=("first", "middle"), data=str(DATA),
                 answerable_only=False, log=lambda *a: None, dataset=dataset)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 12 and not any(r["dropped"] for r in rows)
    items = {it.id: it for it in datasets.load(dataset, 6, DATA, n_items=200)}  # as evaluate.run loads them
    for r in rows:
        it = items[r["id"]]
        passages, _ = evaluate.documents(it, r["slot"], 6)
        docs = tmp_path / f"{r['id']}.jsonl"
        docs.write_text("".join(json.dumps({"title": t, "text": x}) + "\n" for t, x in passages))
        flags = {"vanilla": ["--no-engram"], "engram": [], "reorder": ["--no-engram", "--order", "edges"]}[r["condition"]]
        if it.answer_prefix:
            flags += ["--answer-prefix", it.answer_prefix]
        cli = subprocess.run([sys.executable, "-m", "engram_llama.cli", "run", model, "--chunks", str(docs),
                              r["question"], "--json", "-n", "16", *flags], capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr
        got = json.loads(cli.stdout)
        assert got["answer"] == r["answer"], (r["id"], r["slot"], r["condition"])
        assert got["plan"]["order"] == r["plan"]["order"] and got["plan"]["steered"] == r["plan"]["steered"]
        assert got["prompt_tokens"] == r["n_tokens"] and got["finish_reason"] == r["finish"]
    # the conditions differ where they should: the bias is on only in "engram"
    assert {r["condition"] for r in rows if r["plan"]["steered"]} == {"engram"}
    assert len({r["answer"] for r in rows}) > 1  # not one canned answer


def test_targets_on_a_hand_built_sealed_file(tmp_path, capsys):
    """Issue 27's five targets, each worked out by hand from the rows written: 10 items, the
    hand-tuned defaults far ahead at the middle (+0/-6, p = 0.031) and one degenerate calibrated
    answer miss two; on the 5 items answerable from the gold alone only reordering is ahead."""
    correct = {  # condition -> slot -> the items answered correctly
        "vanilla": {"first": range(3), "middle": range(1), "last": range(4)},
        "reorder": {s: range(5) for s in ("first", "middle", "last")},  # one prompt at every slot
        "engram": {"first": range(5), "middle": range(10), "last": range(7)},
        "calibrated": {"first": range(5), "middle": range(4), "last": range(7)},
    }
    path = tmp_path / "sealed.jsonl"
    with open(path, "w") as f:
        for i in range(10):
            f.write(json.dumps({"id": f"q{i}", "slot": "gold-only", "condition": "vanilla",
                                "answer": "x" if i < 5 else "y", "answers": ["x"]}) + "\n")
            for cond, by_slot in correct.items():
                for slot, ok in by_slot.items():
                    row = {"id": f"q{i}", "slot": slot, "condition": cond, "answer": "x" if i in ok else "y",
                           "answers": ["x"], "n_tokens": 100, "gold_rank": 0 if i < 8 else 3}
                    if cond == "calibrated" and slot == "first" and i == 9:
                        row.update(answer="y y y y", degenerate="loop")
                    f.write(json.dumps(row) + "\n")
    assert ev.targets(str(path)) == 2
    out = capsys.readouterr().out
    assert "| no significant loss to the hand-tuned defaults at any slot | NO | worst slot middle: +0/-6, p 0.031 |" in out
    assert "| middle slot >= vanilla's + 15 points | yes | 40% vs 10% (+30) |" in out
    assert "| worst slot >= vanilla's best slot | yes | 40% vs 40% |" in out
    assert "| ahead of reordering, paired by item and slot | yes | +2/-1, p 1.000 (items by their net) |" in out
    assert "| no more degenerate answers than vanilla | NO | 1 vs 0 (loop 1/0) |" in out
    # calibrated answers 16 of the 24 prompts ranked right (items 0-7), none of items 8-9's 6
    assert "gold chunk ranked first in 80% of 30 prompts; calibrated correct on 67% of those, 0% of the rest" in out
    assert ev.targets(str(path), answerable=True) == 1
    out = capsys.readouterr().out
    assert "| ahead of reordering, paired by item and slot | NO | +0/-1, p 1.000 (items by their net) |" in out
    assert "| middle slot >= vanilla's + 15 points | yes | 80% vs 20% (+60) |" in out


def test_report_on_a_hand_built_file(tmp_path, capsys):
    """report's table, each cell worked out by hand: accuracy, Wilson's interval (Newcombe 1998),
    the verdicts, and the pairs against vanilla with McNemar's exact p."""
    correct = {"vanilla": {"first": range(3), "middle": range(1)},
               "engram": {"first": range(5), "middle": range(10)}}
    path = tmp_path / "r.jsonl"
    with open(path, "w") as f:
        for i in range(10):
            for cond, by_slot in correct.items():
                for slot, ok in by_slot.items():
                    row = {"id": f"q{i}", "slot": slot, "condition": cond, "answer": "x" if i in ok else "y",
                           "answers": ["x"], "n_tokens": 90 + i}
                    if cond == "engram" and slot == "first" and i == 9:
                        row.update(answer="y y y y", degenerate="loop")
                    if cond == "vanilla" and slot == "middle" and i == 8:
                        row.update(answer="")
                    f.write(json.dumps(row) + "\n")
    ev.report(str(path))
    out = capsys.readouterr().out
    assert f"{path}: 10 items, prompts 90-99 tokens" in out
    assert "| vanilla | first | 10 | 30% | 11-60% | 7 | 0 | 0 |  |  |" in out          # Wilson 3/10: 0.108-0.603
    assert "| vanilla | middle | 10 | 10% | 2-40% | 8 | 1 | 0 |  |  |" in out         # 1/10: 0.018-0.404
    # +2/-0: p = 2 x 1/4; the loop is degenerate, not wrong
    assert "| engram | first | 10 | 50% | 24-76% | 4 | 0 | 1 | +2/-0 | 0.500 |" in out
    # +9/-0: p = 2 / 2^9
    assert "| engram | middle | 10 | 100% | 72-100% | 0 | 0 | 0 | +9/-0 | 0.004 |" in out
    # all: 15 of 20, paired by item and slot (+11/-0); its p counts each item once by its net over the
    # slots (items 1-9 ahead, none behind: p = 2 / 2^9), where the 11 placements as pairs would give 2 / 2^11
    assert "| engram | all | 20 | 75% | 53-89% | 4 | 0 | 1 | +11/-0 | 0.004 |" in out


def test_targets_find_a_significant_loss_at_any_slot(tmp_path, capsys):
    """A significant loss (+0/-6, p = 0.031) at one slot misses the first target even where another
    slot loses more answers net without significance (+3/-10, p = 0.092)."""
    path = tmp_path / "sealed.jsonl"
    hand = {"first": range(6), "middle": range(13), "last": range(0)}
    cal = {"first": range(0), "middle": range(10, 16), "last": range(0)}   # middle: wins 13-15, loses 0-9
    with open(path, "w") as f:
        for i in range(20):
            for cond, by_slot in (("vanilla", {}), ("reorder", {}), ("engram", hand), ("calibrated", cal)):
                for slot in ("first", "middle", "last"):
                    ok = i in by_slot.get(slot, ())
                    f.write(json.dumps({"id": f"q{i}", "slot": slot, "condition": cond, "answer": "x" if ok else "y",
                                        "answers": ["x"], "n_tokens": 100}) + "\n")
    ev.targets(str(path))
    assert ("| no significant loss to the hand-tuned defaults at any slot | NO | worst slot first: +0/-6, p 0.031 |"
            in capsys.readouterr().out)


def test_max_new_reaches_the_run_and_zero_is_refused(tmp_path, monkeypatch):
    """--max-new sets the answer cap (a bulletin set without its own cap took NQ's 16 tokens);
    below 1 it is one line, before any model loads."""
    seen = {}
    monkeypatch.setattr(ev, "run", lambda *a, **kw: seen.update(kw))
    out = str(tmp_path / "o.jsonl")
    ev.main(["run", "--model", "m.gguf", "--dataset", "bulletin", "--n", "1", "--out", out, "--max-new", "48"])
    assert seen["max_new"] == 48 and seen["dataset"] == "bulletin"
    ev.main(["run", "--model", "m.gguf", "--out", out])
    assert seen["max_new"] is None
    with pytest.raises(SystemExit, match="--max-new must be at least 1"):
        ev.main(["run", "--model", "m.gguf", "--out", out, "--max-new", "0"])


def test_capped_counts_the_answers_that_stopped_at_the_cap(tmp_path, capsys):
    """research.capped: a row's "finish" where it has one, else the answer's tokens counted again
    (here one token a word): at or above the cap, or one short; failed = wrong, or degenerate even
    where the answer string is in it."""
    from research import capped
    from research.evaluate import judge

    def row(cond, slot, answer, finish=None, degenerate=None):
        r = {"id": "x", "condition": cond, "slot": slot, "answer": answer, "answers": ["Deepak Joshi"],
             "degenerate": degenerate}
        return r if finish is None else {**r, "finish": finish}

    rows = [row("vanilla", "gold-only", "The nodal officer was Deepak", "length"),      # cut, failed
            row("vanilla", "gold-only", "Deepak Joshi", "stop"),
            row("vanilla", "first", "Deepak Joshi was the nodal officer", "length"),  # cut, right
            row("engram", "middle", "Deepak Joshi Deepak Joshi Deepak Joshi", "length", "loop"),  # cut, failed
            row("vanilla", "first", "one two three four"),                             # 4 words: cut, failed
            row("engram", "first", "one two three")]                                   # 3 words: one short
    words = lambda t: len(t.split())
    judged = [{**r, "judge": judge(r["answer"], r["answers"])} for r in rows]
    assert capped.capped(judged, 4, words) == {
        ("vanilla", "gold-only"): [2, 1, 1, 0, 0], ("vanilla", "first"): [2, 2, 1, 0, 0],
        ("engram", "middle"): [1, 1, 1, 0, 0], ("engram", "first"): [1, 0, 0, 1, 1]}
    with pytest.raises(ValueError, match="--model"):
        capped.capped(judged, 4)
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    capped.main([str(f), "--max-new", "4"])
    out = capsys.readouterr().out
    assert "| vanilla | gold-only | 2 | 1 | 1 | 0 | 0 |" in out and "| vanilla | first | 1 | 1 | 0 | 0 | 0 |" in out
    assert out.rstrip().endswith("vanilla 0 (0), engram 1 (1)")  # gold-only rows are not a slot
    with pytest.raises(SystemExit, match="no such file"):
        capped.main([str(tmp_path / "none.jsonl"), "--max-new", "4"])
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="give --model"):
        capped.main([str(f), "--max-new", "4"])


def test_rerun_diff_counts_text_and_verdict_changes(tmp_path, capsys):
    """research.rerun_diff: items matched by (condition, slot, id); a changed text that keeps its
    verdict counts once, a changed verdict twice; a different prompt length is refused."""
    from research import rerun_diff

    def row(i, answer, cond="vanilla", n=100, degenerate=None):
        return {"id": i, "condition": cond, "slot": "last", "answer": answer, "answers": ["42"],
                "n_tokens": n, "degenerate": degenerate}

    a = [row("1", "42"), row("2", "17"), row("3", "42"), row("4", "42", "engram")]
    b = [row("1", "42"), row("2", "19"), row("3", "42 42 42", degenerate="loop"), row("5", "42", "engram")]
    wa, wb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    wa.write_text("".join(json.dumps(r) + "\n" for r in a))
    wb.write_text("".join(json.dumps(r) + "\n" for r in b))
    rerun_diff.main([str(wa), str(wb)])
    assert "| vanilla | last | 3 | 2 | 1 | 2 | 1 |" in capsys.readouterr().out
    wb.write_text(json.dumps(row("1", "42", n=101)) + "\n")
    with pytest.raises(SystemExit, match="not the same prompt"):
        rerun_diff.main([str(wa), str(wb)])
    with pytest.raises(SystemExit, match="share no"):
        rerun_diff.main([str(wa), str(wb), "--conditions", "engram"])


def test_load_rows_judges_stored_answers_again_for_degeneracy(tmp_path):
    """Rows keep the answer's text, so a fix to the text-only checks (here a value run into zeros,
    once passed as number formatting) reaches rows already run; a stored recital, which needs the
    documents, stands; rows run before the checks existed are left as they were."""
    uuid = "a1334580-0545-450f-a935-86a6eef716d4"
    rows = [{"id": "1", "slot": "middle", "condition": "engram", "answer": f"{uuid} is 1" + "0" * 20,
             "answers": [uuid], "degenerate": None},
            {"id": "2", "slot": "middle", "condition": "engram", "answer": f"It is {uuid}.",
             "answers": [uuid], "degenerate": None},
            {"id": "3", "slot": "middle", "condition": "engram", "answer": "the helpline number is printed",
             "answers": [uuid], "degenerate": "recital"},
            {"id": "4", "slot": "middle", "condition": "engram", "answer": "1" + "0" * 20, "answers": [uuid]},
            {"id": "5", "slot": "gold-only", "condition": "vanilla", "answer": f"{uuid} is 1" + "0" * 20,
             "answers": [uuid]},
            {"id": "6", "slot": "middle", "condition": "engram", "answer": "It is 1800 1800.",   # no loop now
             "answers": ["1800"], "degenerate": "loop"}]
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = ev.load_rows(f)
    assert [r.get("degenerate") for r in got] == ["stutter", None, "recital", None, None, None]
    assert [ev.verdict(r) for r in got] == ["degenerate", "correct", "degenerate", "wrong", "correct", "correct"]


def test_rows_without_gold_answers_keep_their_stored_verdict(tmp_path):
    """The first runs kept no "answers": their stored judge stands (it was the one reported)."""
    path = tmp_path / "old.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (
        {"id": "q0", "slot": "first", "condition": "vanilla", "answer": "Paris", "judge": "correct", "n_tokens": 9},
        {"id": "q0", "slot": "first", "condition": "engram", "answer": "Paris", "judge": "correct", "n_tokens": 9,
         "answers": ["Lyon"]})))
    rows = {r["condition"]: r["judge"] for r in ev.load_rows(path)}
    assert rows == {"vanilla": "correct", "engram": "wrong"}   # the second judged again against its answers


def test_rejudge_clears_a_copy_of_the_answers_own_sentence_only():
    """The second reading of recitals: an answer that holds the gold and continues copying its own
    sentence is cleared; a copy of another sentence, or without the gold in the answer, is not."""
    from engram_llama.quality import degenerate
    from research.rejudge import cleared

    gold_sentence = ("The Turtles first appeared in 1984 in Dover, and they have since been released in "
                     "various incarnations by various comic book companies.")
    other = "The helpline number is printed on the back of every sanction letter issued by the office."
    texts = [gold_sentence + " " + other, "An unrelated passage about rivers and hills in the north."]
    own = "They first came out in 1984, and have since been released in various incarnations by various comic"
    assert degenerate(own, "\n".join(texts), ["1984"]) == "recital"   # as judged: the run holds no 1984
    assert cleared(own, ["1984"], texts, "When did the Turtles first come out?")
    elsewhere = "It was 1984. The helpline number is printed on the back of every sanction letter"
    assert degenerate(elsewhere, "\n".join(texts), ["1984"]) == "recital"
    assert not cleared(elsewhere, ["1984"], texts, "")
    no_gold = "They have since been released in various incarnations by various comic book companies"
    assert not cleared(no_gold, ["1984"], texts, "")
