"""Scoring and statistics of the evaluation harness."""
import json
import sys
from pathlib import Path

import pytest

from engram_llama.evaluate import hard_distractors, judge, normalize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import eval as ev  # noqa: E402


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
    assert ev.mcnemar(0, 0) == 1.0
    assert ev.mcnemar(6, 0) == pytest.approx(2 / 64)
    assert ev.mcnemar(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)


@pytest.mark.parametrize("n_passages", [12, 36])  # 36: more than the five other years can vary (once hung)
def test_domain_set_is_seeded_and_hard(n_passages):
    from engram_llama import datasets

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

    from engram_llama import datasets

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


def test_parse_layers_specs():
    from engram_llama.evaluate import parse_layers

    gemma_soft, gemma_global = list(range(18)), [5, 11, 17]  # Gemma-3-270M: every layer softmax, 3 global
    assert parse_layers("default", gemma_global, gemma_soft) == [5, 11, 17]
    assert parse_layers("early", gemma_global, gemma_soft) == [5, 11]
    assert parse_layers("last", gemma_global, gemma_soft) == [17]
    assert parse_layers("local", gemma_global, gemma_soft) == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16]
    assert parse_layers("3-6", gemma_global, gemma_soft) == [3, 4, 5, 6]


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
    assert "| **all** | 6 | 33% | 67% | +3/-1 |" in out
    ev.pooled([str(f1), str(f2)], "b", "a", slot="first")
    assert "| **all** | 3 | 33% | 67% | +2/-1 |" in capsys.readouterr().out
    # two reordering conditions share one prompt across slots: refused rather than counted three times
    with pytest.raises(SystemExit, match="one prompt at every slot"):
        ev.pooled([str(f1)], "reorder+engram s1 top1", "reorder", slot="all")


def test_resume_refuses_a_file_made_with_the_other_prompt(tmp_path):
    """A KV file written with the key restated is not resumed without it, nor the reverse: the
    rows record the prefix, and the check runs before any model is loaded."""
    import gzip

    from engram_llama import evaluate

    data = tmp_path / "kv.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "kv-1", "ordered_kv_records": [["k1", "v1"], ["k2", "v2"]], "key": "k1",
                            "value": "v1"}) + "\n")
    for restated, row in ((False, {"prefix": "key"}), (True, {})):
        out = tmp_path / f"out-{restated}.jsonl"
        out.write_text(json.dumps({"id": "kv-1", "slot": "gold-only", "condition": "vanilla", "answer": "v1",
                                   "judge": "correct", "answers": ["v1"], **row}) + "\n")
        with pytest.raises(ValueError, match="the key restated; resume it " + ("with" if not restated else "without")):
            evaluate.run("no-model.gguf", str(out), dataset="kv", data=str(data), n_passages=2, restate_key=restated)


def test_miss_kind_and_the_misses_report(tmp_path, capsys):
    """A KV key copied is an echo, a gold UUID with a piece repeated a near miss, a sentence other;
    the report tallies rows written here by hand."""
    from engram_llama.evaluate import miss_kind

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
        for i, (slot, ans) in enumerate([("last", key), ("last", gold), ("last", "I don't know"), ("first", "x y z")]):
            f.write(json.dumps({"id": f"kv{i}", "slot": slot, "condition": "c", "answer": ans, "answers": [gold],
                                "question": q}) + "\n")
    ev.misses(str(path))
    out = capsys.readouterr().out
    assert "| c | first | 1 | 0 | 0 | 0 | 0 | 1 |" in out
    assert "| c | last | 3 | 1 | 1 | 1 | 0 | 0 |" in out


def test_compose_takes_the_reread_row_only_where_the_moved_chunk_was_first(capsys):
    """The rule reread "first" from other conditions' rows, worked out by hand: at the first slot
    the reread row when the gold ranked first (it is chunk 0, so it was moved), the shift's when it
    did not; at the middle and last slots the shift's when the gold ranked first (the moved chunk
    is then not chunk 0), nothing when it did not (which chunk moved is unknown: named instead);
    the rule's own rows are kept; the second shift condition fills in for the first."""
    def row(i, slot, cond, ans, rank=0):
        return {"id": i, "slot": slot, "condition": cond, "answer": ans, "gold_rank": rank}
    rows = [row("q1", "first", "again", "A1"), row("q1", "first", "shift", "S1"),
            row("q2", "first", "again", "A2", 3), row("q2", "first", "shift", "S2", 3),
            row("q1", "middle", "again", "A3"), row("q1", "middle", "shift", "S3"),
            row("q2", "middle", "shift", "S4", 2),
            row("q3", "last", "old shift", "S5"),
            row("q4", "last", "shift", "S6", 1), row("q4", "last", "rule", "R6", 1)]
    out = ev.compose(rows, "rule", "again", ["shift", "old shift"])
    got = {(r["id"], r["slot"]): r["answer"] for r in out}
    assert got == {("q1", "first"): "A1", ("q2", "first"): "S2", ("q1", "middle"): "S3",
                   ("q3", "last"): "S5", ("q4", "last"): "R6"}
    assert all(r["condition"] == "rule" for r in out)
    assert "1 prompts left out, the gold not ranked first there: q2@middle" in capsys.readouterr().out


def test_fill_near_stands_in_only_before_the_last_quarter(capsys):
    """A condition run at the last slot alone borrows the base's first- and middle-slot rows where
    the gold ranked first (the same bias vector there); its own rows win, the base's last-slot rows
    never stand in, and a prompt whose top-1 was another chunk is named instead. By hand."""
    def row(i, slot, cond, ans, rank=0):
        return {"id": i, "slot": slot, "condition": cond, "answer": ans, "gold_rank": rank}
    rows = [row("q1", "first", "base", "B1"), row("q1", "middle", "base", "B2"), row("q1", "last", "base", "B3"),
            row("q1", "last", "near3", "N3"), row("q2", "first", "base", "B4", 5), row("q2", "first", "near3", "N4", 5),
            row("q2", "middle", "base", "B5", 5)]
    out = ev.fill_near(rows, "near3", "base")
    assert {(r["id"], r["slot"]): r["answer"] for r in out} == {("q1", "first"): "B1", ("q1", "middle"): "B2"}
    assert all(r["condition"] == "near3" for r in out)
    assert "1 prompts left out, the gold not ranked first there: q2@middle" in capsys.readouterr().out
