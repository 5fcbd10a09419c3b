"""Calibrated steering: the policy a profile holds, profiles keyed by the model file's identity,
the paired choice rule, and `engram-llama calibrate` end to end on generated models."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engram_llama import calibrate, policy, profile
from engram_llama.gguf_check import identity, read_header
from engram_llama.plan import Settings, candidate_settings, with_policy
from engram_llama.policy import CANDIDATES, LATE, VANILLA, Candidate, Policy, candidates
from conftest import gemma3_path
from research import synth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_LLAMA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_identity_hashes_the_header_gguf_py_reads():
    """The header ends where gguf-py's reader puts the tensor data; the digest is of those bytes."""
    import gguf

    for name in ("llama", "qwen35"):
        p = synth.cached_model(name)
        off = gguf.GGUFReader(str(p), "r").data_offset
        assert read_header(p).data_offset == off
        ident = identity(p)
        assert ident["header_sha256"] == hashlib.sha256(p.read_bytes()[:off]).hexdigest()
        assert ident["size"] == p.stat().st_size and ident["architecture"] == name
    assert identity(synth.cached_model("llama")) != identity(synth.cached_model("qwen35"))


def test_policy_json_round_trip_and_refusals():
    p = Policy(steer=True, peak=4.0, focus="sentences", reorder=True, edges=1.0, near=0.75)
    assert Policy.from_json(json.loads(json.dumps(p.to_json()))) == p
    # a profile written before the share was recorded was measured at half the peak
    old = {k: v for k, v in p.to_json().items() if k != "near"}
    assert Policy.from_json(old).near == 0.5
    # one written before calibrate chose the layers: the family's
    assert Policy.from_json({k: v for k, v in p.to_json().items() if k != "layers"}).layers == "default"
    late = Policy(steer=True, peak=4.0, layers="late")
    assert Policy.from_json(json.loads(json.dumps(late.to_json()))) == late
    assert "layers" not in p.to_json()   # a profile on the family's layers reads in older versions too
    assert "the last quarter of layers" in late.label and "layers" not in p.label
    for bad in ({"steer": True}, {**p.to_json(), "peak": -1}, {**p.to_json(), "focus": "word"},
                {**p.to_json(), "layers": "early"}, {**p.to_json(), "layers": None},
                {**p.to_json(), "steer": "yes"}, {**p.to_json(), "extra": 1}, [1],
                {**p.to_json(), "near": 1.5}, {**p.to_json(), "near": True}):
        with pytest.raises(ValueError):
            Policy.from_json(bad)


def test_a_profile_applies_the_settings_its_candidate_was_measured_with():
    """with_policy turns a profile into exactly the Settings calibrate ran for the chosen candidate;
    the user's own options win; a profile that turned steering off leaves the prompt unbiased."""
    assert [c.name for c in candidates(True)] == [c.name for c in CANDIDATES[:4]] + ["late+4"] + ["reorder", "reorder+1"]
    assert candidates(False) == CANDIDATES and LATE not in CANDIDATES
    def keep(strength, near, granularity, layers=None):  # written out, not built by the code under test
        return Settings(order="keep", strength=strength, near=near, mid=0.0, granularity=granularity, layers=layers)

    want = {0.5: {"chunk+2": keep(2.0, 1.0, "novel"), "chunk+4": keep(4.0, 2.0, "novel"),
                  "sentences+2": keep(2.0, 1.0, "focus"), "sentences+4": keep(4.0, 2.0, "focus"),
                  "late+4": keep(4.0, 2.0, "novel", "late")},
            0.75: {"chunk+2": keep(2.0, 1.5, "novel"), "chunk+4": keep(4.0, 3.0, "novel"),
                   "sentences+2": keep(2.0, 1.5, "focus"), "sentences+4": keep(4.0, 3.0, "focus"),
                   "late+4": keep(4.0, 3.0, "novel", "late")}}
    for near in (0.5, 0.75):
        want[near].update({"reorder": Settings(order="edges", strength=0.0, engram=False),
                           "reorder+1": Settings(order="edges", strength=1.0, engram=True)})
        for c in candidates(True):
            if c.order == "keep":
                pol = Policy(steer=True, peak=c.strength, focus=c.focus, near=near, layers=c.layers)
            else:
                pol = Policy(steer=False, reorder=True, edges=c.strength, near=near)
            assert with_policy(Settings(), pol) == candidate_settings(c, near) == want[near][c.name], (c, near)
    # what each candidate runs, written out (with_policy itself builds on candidate_settings)
    by_name = {c.name: c for c in CANDIDATES}
    assert candidate_settings(by_name["sentences+4"], 0.75) == Settings(order="keep", strength=4.0, near=3.0, mid=0.0,
                                                                        granularity="focus")
    assert candidate_settings(by_name["chunk+2"], 0.5) == Settings(order="keep", strength=2.0, near=1.0, mid=0.0,
                                                                   granularity="novel")
    assert candidate_settings(LATE, 0.5) == Settings(order="keep", strength=4.0, near=2.0, mid=0.0, granularity="novel",
                                                     layers="late")
    assert candidate_settings(by_name["reorder+1"], 0.5) == Settings(order="edges", strength=1.0, engram=True)
    assert candidate_settings(by_name["reorder"], 0.5) == Settings(order="edges", strength=0.0, engram=False)
    assert candidate_settings(VANILLA, 0.5) == Settings(order="keep", engram=False)
    pol = Policy(steer=True, peak=4.0, focus="sentences", reorder=True, edges=1.0)
    assert with_policy(Settings(order="keep"), pol) == candidate_settings(Candidate("", "keep", 4.0, "sentences"), 0.5)
    # next to the question: the family's hand-tuned ratio at ~4K (+2 of +4 dense, +3 of +4 windowed)
    assert with_policy(Settings(), Policy(steer=True, peak=4.0, near=policy.near_share(False))).near == policy.NEAR_WINDOWED
    assert with_policy(Settings(), Policy(steer=True, peak=4.0, near=policy.near_share(True))).near == policy.NEAR
    assert with_policy(Settings(strength=3.0), pol).strength == 3.0
    off = Policy()
    assert with_policy(Settings(), off).engram is False
    assert with_policy(Settings(strength=2.0), off).engram is True   # the user's own strength steers
    assert with_policy(Settings(), None) == Settings()                # uncalibrated: the hand-tuned path
    assert with_policy(Settings(engram=False), pol) == Settings(engram=False)
    # reordering asked for where the profile did not choose it: the hand-tuned reordering (+1)
    assert with_policy(Settings(order="edges"), Policy(steer=True, peak=4.0)) == Settings(order="edges")
    # a late profile: the user's own layers win, the user's strength keeps the profile's layers
    late = Policy(steer=True, peak=4.0, layers="late")
    assert with_policy(Settings(), late).layers == "late"
    assert with_policy(Settings(layers=[1, 2]), late).layers == [1, 2]
    assert with_policy(Settings(strength=3.0), late).layers == "late"
    # applied twice (prepare, then plan) it gives the same settings
    for pol in (Policy(steer=True, peak=4.0, focus="sentences", reorder=True, edges=1.0), Policy(steer=True, peak=2.0),
                Policy(), Policy(reorder=True), late):
        for s in (Settings(), Settings(order="keep"), Settings(strength=3.0), Settings(order="move")):
            once = with_policy(s, pol)
            assert with_policy(once, pol) == once, (pol, s)


def _write(tmp_path, ident, **over):
    prof = profile.Profile(Policy(steer=True, peak=2.0), ident, {"n": 1}, "test")
    d = {**prof.to_json(), **over}
    p = tmp_path / f"p{len(list(tmp_path.iterdir()))}.json"
    p.write_text(json.dumps(d))
    return p


def test_profiles_are_refused_for_another_model_version_or_when_corrupt(tmp_path):
    ident = identity(synth.cached_model("llama"))
    other = identity(synth.cached_model("gemma3"))
    assert profile.read(_write(tmp_path, ident), ident).policy.peak == 2.0
    cases = [(_write(tmp_path, other), "another model"),
             (_write(tmp_path, ident, policy_version=policy.POLICY_VERSION + 1), "policy version"),
             (_write(tmp_path, ident, format="x"), "not an engram-llama profile"),
             (_write(tmp_path, ident, policy={"steer": 1}), "corrupt")]
    for path, why in cases:
        with pytest.raises(profile.ProfileError, match=why):
            profile.read(path, ident)
    bad = tmp_path / "bad.json"
    for text in ('{"format": "engram-', "[" * 100_000):  # cut short; nested past the parser's depth
        bad.write_text(text)
        with pytest.raises(profile.ProfileError, match="corrupt"):
            profile.read(bad, ident)
    with open(bad, "wb") as f:  # a model file given as --profile by mistake is refused, not read whole
        f.truncate(profile.MAX_BYTES + 1)
    with pytest.raises(profile.ProfileError, match="not an engram-llama profile"):
        profile.read(bad, ident)


def test_find_prefers_the_cache_folder_and_skips_a_broken_one_with_a_line(cache, tmp_path):
    model = synth.cached_model("llama")
    ident = identity(model)
    assert profile.find(model) is None
    target = cache / "profiles" / f"{profile.key(ident)}.json"
    profile.write(profile.Profile(Policy(steer=True, peak=4.0), ident), target)
    assert [p.name for p in target.parent.iterdir()] == [target.name]   # no temporary file left
    assert profile.find(model).policy.peak == 4.0
    target.write_text("{")
    said = []
    assert profile.find(model, warn=said.append) is None
    assert len(said) == 1 and "corrupt" in said[0]


def test_every_builtin_profile_is_named_by_its_model_and_reads():
    """A built-in profile is found by its file name alone: a name that is not its model's key, or a
    file of another policy version, would never be applied (or be refused at every run)."""
    files = sorted(profile.BUILTIN.glob("*.json"))
    assert files, "no built-in profile shipped"
    for f in files:
        prof = profile.read(f)
        assert f.stem == profile.key(prof.model), f
        assert prof.measured.get("items", 0) > 0 and prof.tool


@pytest.mark.skipif(gemma3_path() is None, reason="Gemma-3-270M not installed (scripts/setup.sh)")
def test_gemma_runs_its_builtin_profile_without_a_cache(cache):
    """The file scripts/setup.sh installs finds the profile that ships for it (EVAL section 4: the
    second held-out split): +4 over the chunk, the windowed family's +3 of +4 next to the question."""
    from engram_llama.runtime import EngramLlama

    found = profile.find(gemma3_path())
    assert found is not None and found.path.parent == profile.BUILTIN
    assert found.policy == Policy(steer=True, peak=4.0, focus="chunk", reorder=False, edges=0.0, near=0.75)
    eng = EngramLlama(str(gemma3_path()), n_ctx=512, n_threads=2, chat=False)
    try:
        assert eng.profile is not None and eng.profile.path == found.path
        assert profile.describe(eng.profile)["calibrated"] is True
    finally:
        eng.close()
    # `--profile none`: the hand-tuned defaults, named uncalibrated
    from engram_llama.cli import _profile

    eng = EngramLlama(str(gemma3_path()), n_ctx=512, n_threads=2, chat=False,
                      profile=_profile(str(gemma3_path()), "none"))
    try:
        assert eng.profile is None and eng.policy is None
        assert profile.describe(eng.profile)["calibrated"] is False
    finally:
        eng.close()


def test_a_late_profile_biases_the_last_quarter_of_the_layers(cache):
    """A dense model's profile that chose late+4 biases its last quarter of layers alone, at +4;
    the user's --layers still wins."""
    from engram_llama.chunks import Chunk
    from engram_llama.runtime import EngramLlama

    model = synth.cached_model("llama-smol")
    ident = identity(model)
    profile.write(profile.Profile(Policy(steer=True, peak=4.0, layers="late"), ident),
                  cache / "profiles" / f"{profile.key(ident)}.json")
    eng = EngramLlama(str(model), n_ctx=512, n_threads=2, chat=False)
    try:
        assert eng.profile is not None and eng.policy.layers == "late"
        n = len(eng.hook.kinds)
        chunks = [Chunk(0, "a", "The Kakkanad office opened in 1984."), Chunk(1, "b", "Rain fell in Pune.")]
        ans = eng.ask("When did the Kakkanad office open?", chunks, max_tokens=2)
        assert ans.plan.steered and ans.layers == list(range(n - n // 4, n)) and n // 4 >= 1
        assert ans.plan.strength == 4.0
        ans = eng.ask("When did the Kakkanad office open?", chunks, max_tokens=2, settings=Settings(layers=[0]))
        assert ans.layers == [0]
    finally:
        eng.close()


def _rows(pairs: dict[str, list[tuple[str, bool]]]) -> list[dict]:
    """Rows for the choice rule: per condition, a list of (slot, correct)."""
    n = len(next(iter(pairs.values())))
    rows = []
    for i in range(n):
        slot = pairs["vanilla"][i][0]
        res = {name: {"verdict": "correct" if v[i][1] else "wrong"} for name, v in pairs.items()}
        rows.append({"item": i // 3, "slot": slot, "results": res})
    return rows


def _conditions(vanilla, dense=False, **hits):
    names = [n for n, _ in calibrate._conditions(dense=dense)]
    slots = [calibrate.tasks.SLOTS[i % 3] for i in range(len(vanilla))]
    out = {n: list(zip(slots, hits.get(n.replace("+", "_").replace("-", "_"), vanilla))) for n in names}
    return out


def test_a_candidate_that_loses_two_answers_net_at_one_slot_does_not_qualify():
    """10 items won at the first and last slots (p = 1/1024) do not carry two lost middles."""
    vanilla = [i % 3 == 1 and i < 6 for i in range(30)]                  # vanilla right at items 0-1's middle
    cand = [i % 3 != 1 for i in range(30)]                               # the candidate at every first and last
    rows = _rows(_conditions(vanilla, chunk_2=cand))
    assert calibrate._paired(rows, "chunk+2", "vanilla")[:2] == (10, 0)
    assert calibrate.qualifies(rows, "chunk+2") == (False, "loses 2 net at a slot")
    vanilla[4] = False                                                   # one lost middle: it qualifies
    ok, why = calibrate.qualifies(_rows(_conditions(vanilla, chunk_2=cand)), "chunk+2")
    assert ok and why == "items +10/-0 vs vanilla, p = 0.001"


def test_the_paired_rule_keeps_a_clear_winner_and_turns_off_otherwise(monkeypatch):
    vanilla = [False] * 30
    win = [i % 3 == 1 or i < 6 for i in range(30)]            # 14 wins over vanilla, no loss
    rows = _rows(_conditions(vanilla, chunk_4=win))
    pol, chosen = calibrate.choose(rows)
    assert (pol.steer, pol.peak, pol.focus, pol.reorder) == (True, 4.0, "chunk", False)
    assert chosen["given_order"] == "chunk+4"
    # 3 wins, 1 loss: p = 0.31, not enough
    weak = list(vanilla)
    weak[0] = weak[1] = weak[2] = True
    van = list(vanilla)
    van[3] = True
    pol, _ = calibrate.choose(_rows(_conditions(van, chunk_2=[a or False for a in weak])))
    assert not pol.steer and not pol.reorder
    # a winner with significantly more degenerate answers than vanilla does not qualify: 4 against
    # 0 placements is p = 1/16 <= 0.10; 3 against 0 (p = 1/8) is not evidence of harm
    rows = _rows(_conditions(vanilla, chunk_4=win))
    for i in (0, 1, 5):
        rows[i]["results"]["chunk+4"]["verdict"] = "degenerate"
    assert calibrate.qualifies(rows, "chunk+4")[0] is True
    rows[8]["results"]["chunk+4"]["verdict"] = "degenerate"
    ok, why = calibrate.qualifies(rows, "chunk+4")
    assert ok is False and "placements +4/-0, p = 0.06" in why
    # the pairs are placements: where vanilla is degenerate too, the placement drops out
    for i in (0, 1):
        rows[i]["results"]["vanilla"]["verdict"] = "degenerate"
    assert calibrate._degenerate_pairs(rows, "chunk+4", "vanilla") == (2, 0)
    # reordering that wins and is not behind the given order's choice is kept for retrieved chunks
    rows = _rows(_conditions(vanilla, chunk_2=win, reorder_1=win))
    pol, chosen = calibrate.choose(rows)
    assert (pol.steer, pol.peak, pol.reorder, pol.edges) == (True, 2.0, True, 1.0)
    # ... and dropped when it is behind it (paired by item)
    less = [w and i % 2 == 0 for i, w in enumerate(win)]
    pol, _ = calibrate.choose(_rows(_conditions(vanilla, chunk_2=win, reorder_1=less)))
    assert (pol.steer, pol.reorder) == (True, False)
    # a tie goes to the milder strength, whatever the candidates' order
    pol, _ = calibrate.choose(_rows(_conditions(vanilla, chunk_4=win, sentences_2=win)))
    assert (pol.peak, pol.focus) == (2.0, "sentences")
    # a dense model's log has the late layers: kept where they alone qualify, and recorded ...
    rows = _rows(_conditions(vanilla, dense=True, chunk_4=win, late_4=win))
    for i in (0, 1, 5, 8):
        rows[i]["results"]["chunk+4"]["verdict"] = "degenerate"
    pol, chosen = calibrate.choose(rows)
    assert (pol.steer, pol.peak, pol.focus, pol.layers, chosen["given_order"]) == (True, 4.0, "chunk", "late", "late+4")
    assert "late+4" in calibrate.table(rows) and "late+4" not in calibrate.table(_rows(_conditions(vanilla)))
    # ... and on a tie with the family's layers at the same strength, those (the earlier) stay
    pol, _ = calibrate.choose(_rows(_conditions(vanilla, dense=True, chunk_4=win, late_4=win)))
    assert (pol.peak, pol.layers) == (4.0, "default")
    # the items, not the placements, are the pairs: 3 wins at the slots of one item are one win
    one = [i < 3 for i in range(30)]
    assert calibrate._paired(_rows(_conditions(vanilla, chunk_2=one)), "chunk+2", "vanilla")[:2] == (1, 0)


def test_a_cut_line_in_the_log_is_dropped_and_later_rows_stand_alone(tmp_path):
    head = {"model": "m", "n_ctx": 2048, "conditions": ["vanilla"]}
    log = tmp_path / "log.jsonl"
    row = {"item": 0, "kind": "prose", "slot": "first", "n_chunks": 6, "prompt_tokens": 1900, "seconds": 1.0,
           "results": {"vanilla": {"answer": "Pune", "verdict": "correct"}}}
    log.write_text(json.dumps(head) + "\n" + json.dumps(row) + "\n" + '{"item": 0, "slot": "mid')  # killed mid-write
    assert calibrate._read_log(log, head) == [row]
    with open(log, "a") as f:  # the next run appends its rows
        f.write(json.dumps({**row, "slot": "middle"}) + "\n")
    assert [r["slot"] for r in calibrate._read_log(log, head)] == ["first", "middle"]
    # another setup's log is set aside, not mixed in
    assert calibrate._read_log(log, {**head, "n_ctx": 4096}) == [] and not log.exists()
    assert len(list(tmp_path.glob("log.old-*.jsonl"))) == 1


def test_a_resume_out_of_budget_inside_an_item_counts_whole_items_only(tmp_path, monkeypatch):
    """Stopped inside item 5 (Ctrl-C after its first placement), resumed with the budget spent: the
    five whole items are too few, where counting the half item would have written a profile."""
    from types import SimpleNamespace

    from engram_llama._hook import LayerKind

    monkeypatch.setenv("ENGRAM_LLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrate, "_fit_chunks", lambda eng, task, room: 10)

    def ask(*a, **kw):
        raise AssertionError("nothing runs: the budget is spent")

    eng = SimpleNamespace(hook=SimpleNamespace(kinds=[LayerKind.FULL] * 4), ask=ask)
    ident = {"architecture": "llama", "header_sha256": "ab" * 32, "size": 1}
    head = {"model": profile.key(ident), "n_ctx": 4096, "chat": True, "seed": calibrate.SEED,
            "max_tokens": calibrate.MAX_TOKENS, "conditions": [n for n, _ in calibrate._conditions(dense=True)],
            "policy_version": policy.POLICY_VERSION, "tasks_version": calibrate.tasks.VERSION,
            "near_share": policy.near_share(True)}
    rows = [{"item": i, "kind": "kv", "slot": s, "n_chunks": 10, "prompt_tokens": 3000, "seconds": 400.0,
             "results": {c: {"answer": "x", "verdict": "wrong"} for c in head["conditions"]}}
            for i in range(6) for s in calibrate.tasks.SLOTS if i < 5 or s == "first"]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(x) + "\n" for x in [head] + rows))
    with pytest.raises(calibrate.CalibrationError, match="allowed 5 items"):
        calibrate._run(eng, ident, 4096, 30, True, False, log, lambda m: None)
    assert len(log.read_text().splitlines()) == 1 + 16   # the half item's row stays for a later run


def test_a_log_cut_inside_a_character_or_holding_u2028_resumes(tmp_path):
    """Rows are written with ensure_ascii=False: a crash can cut one inside a character, and an
    answer may hold U+2028 (a line break to str.splitlines)."""
    head = {"model": "m", "n_ctx": 2048, "conditions": ["vanilla"]}
    log = tmp_path / "log.jsonl"
    row = {"item": 0, "kind": "bulletin", "slot": "first", "n_chunks": 6, "prompt_tokens": 1900, "seconds": 1.0,
           "results": {"vanilla": {"answer": "₹6,000\u2028a year", "verdict": "correct"}}}
    cut = (json.dumps({**row, "slot": "middle"}, ensure_ascii=False).encode())
    cut = cut[:cut.index("₹".encode()) + 1]  # one byte into the rupee sign
    log.write_bytes((json.dumps(head) + "\n" + json.dumps(row, ensure_ascii=False) + "\n").encode() + cut)
    assert calibrate._read_log(log, head) == [row]
    assert log.read_bytes().endswith(b"\n") and calibrate._read_log(log, head) == [row]


def test_a_log_line_that_is_not_a_placement_row_is_dropped_not_fatal(tmp_path):
    """An edited or foreign line would stop every later run of that log after the model loads."""
    head = {"model": "m", "n_ctx": 2048, "conditions": ["vanilla", "chunk+2"]}
    log = tmp_path / "log.jsonl"
    row = {"item": 1, "kind": "kv", "slot": "last", "n_chunks": 6, "prompt_tokens": 1900, "seconds": 2.5,
           "results": {"vanilla": {"answer": "x"}, "chunk+2": {"answer": "y"}}}
    bad = [123, [row], {**row, "item": calibrate.MAX_ITEMS}, {**row, "item": True}, {**row, "slot": "mid"},
           {**row, "kind": "poem"}, {**row, "n_chunks": 0}, {**row, "n_chunks": 1000}, {**row, "n_chunks": 6.0},
           {**row, "seconds": float("nan")}, {**row, "seconds": -1}, {**row, "seconds": True},
           {**row, "results": {"vanilla": {"answer": "x"}}}, {k: v for k, v in row.items() if k != "seconds"}]
    log.write_text("".join(json.dumps(x) + "\n" for x in [head, *bad, row]))
    assert calibrate._read_log(log, head) == [row]
    assert log.read_text().splitlines() == [json.dumps(head), json.dumps(row)]  # rewritten without them


def test_the_candidates_run_and_the_profile_records_the_share_the_log_names():
    """Each given-order candidate runs with its strength times the share next to the question; a log
    written before the share was recorded (no near_share in its head) was measured at half."""
    conds = dict(calibrate._conditions(0.75))
    assert conds["chunk+4"].near == 3.0 and conds["chunk+2"].near == 1.5 and conds["sentences+4"].near == 3.0
    assert dict(calibrate._conditions(0.5))["chunk+4"].near == 2.0
    items = calibrate.task_items(2048)
    rows = []
    for i in range(6):
        for slot in calibrate.tasks.SLOTS:
            res = {n: {"answer": items[i].answers[0] if n == "chunk+4" else "no idea"} for n, _ in calibrate._conditions()}
            rows.append({"item": i, "kind": items[i].kind, "slot": slot, "n_chunks": 6, "prompt_tokens": 1900,
                         "seconds": 1.0, "results": res})
    head = {"n_ctx": 2048, "max_tokens": calibrate.MAX_TOKENS, "chat": True, "seed": calibrate.SEED}
    ident = identity(synth.cached_model("llama"))
    old = calibrate.decide(rows, items, ident, head)
    assert old.policy.steer and old.policy.peak == 4.0 and old.policy.near == 0.5
    assert calibrate.decide(rows, items, ident, {**head, "near_share": 0.75}).policy.near == 0.75


def test_sign_test_against_the_binomial():
    from math import comb

    assert calibrate.sign_p(6, 1) == pytest.approx((comb(7, 6) + 1) / 128)
    assert calibrate.sign_p(0, 0) == 1.0


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "engram_llama.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


@pytest.mark.parametrize("arch,chat", [("llama-smol", False), ("qwen35-chat", True)])
def test_calibrate_end_to_end_on_a_generated_model(arch, chat, cache, tmp_path, monkeypatch):
    """The whole path on random weights (their choice means nothing): every placement logged,
    the profile written and then found by `ask`; a second run resumes instead of starting over."""
    monkeypatch.setattr(calibrate, "MIN_ITEMS", 2)
    monkeypatch.setattr(calibrate, "MAX_ITEMS", 2)  # ends the run by its count, not by the clock
    model = synth.cached_model(arch)
    prof, path = calibrate.run(str(model), n_ctx=2048, budget_minutes=30, chat=chat, progress=False,
                               log=lambda m: None)
    head, *rows = [json.loads(l) for l in calibrate.log_path(identity(model), 2048, chat).read_text().splitlines()]
    # a change to the tasks (or the conditions, or the policy's meaning) gives another head: set aside
    assert head["tasks_version"] == calibrate.tasks.VERSION and head["policy_version"] == calibrate.POLICY_VERSION
    # the candidates ran with the family's share next to the question, and the profile records it
    assert head["near_share"] == (0.5 if arch.startswith("llama") else 0.75) == prof.policy.near
    assert len(rows) == 3 * calibrate.MAX_ITEMS
    assert {r["slot"] for r in rows} == set(calibrate.tasks.SLOTS)
    t = prof.measured["table"]
    # the late layers are a candidate on the dense model only
    assert set(t) == {n for n, _ in calibrate._conditions(dense=arch.startswith("llama"))}
    assert ("late+4" in t) == arch.startswith("llama") == ("late+4" in head["conditions"])
    assert all(t[n]["n"] == len(rows) for n in t)
    assert path.exists() and profile.read(path, identity(model)).policy == prof.policy
    said = []
    prof2, _ = calibrate.run(str(model), n_ctx=2048, budget_minutes=30, chat=chat, progress=False, log=said.append)
    assert said and said[0].startswith("resuming")
    rows2 = calibrate.log_path(identity(model), 2048, chat).read_text().splitlines()[1:]
    assert len(rows2) == len(rows)   # nothing measured twice
    from engram_llama.runtime import EngramLlama

    eng = EngramLlama(str(model), n_ctx=2048, chat=chat)
    try:
        assert eng.profile is not None and eng.profile.policy == prof2.policy
    finally:
        eng.close()


def one_line_error(res, text):
    assert res.returncode != 0, res.stdout
    err = res.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and text in err, err


def test_calibrate_bad_input_is_one_line(cache, tmp_path):
    model = str(synth.cached_model("llama-smol"))
    env = {"ENGRAM_LLAMA_CACHE": str(cache)}
    one_line_error(_cli("calibrate", str(tmp_path / "none.gguf"), env=env), "not found")
    junk = tmp_path / "j.gguf"
    junk.write_bytes(b"NOPE" * 100)
    one_line_error(_cli("calibrate", str(junk), env=env), "not a GGUF")
    cut = tmp_path / "t.gguf"
    cut.write_bytes(Path(model).read_bytes()[:200000])
    one_line_error(_cli("calibrate", str(cut), env=env), "truncated")
    one_line_error(_cli("calibrate", model, "-c", "256", env=env), "too small")
    one_line_error(_cli("calibrate", model, "--budget", "0", env=env), "--budget")
    one_line_error(_cli("calibrate", model, "--budget", "1e307", env=env), "--budget")  # inf in seconds
    one_line_error(_cli("calibrate", model, "-t", "0", env=env), "-t")
    # a folder nobody can make, root included (a read-only folder of ours root would write into)
    one_line_error(_cli("calibrate", model, env={"ENGRAM_LLAMA_CACHE": "/proc/engram-llama-test/c"}), "cannot write")
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(_cli("calibrate", model, env={"ENGRAM_LLAMA_CACHE": str(blocker)}), "cannot write")
    one_line_error(_cli("calibrate", model, "--no-chat", "-c", "2048", "--budget", "0.0001", env=env),
                   "too small: a profile needs")
    assert not list((cache / "profiles").glob("*.json")) if (cache / "profiles").exists() else True
    other = tmp_path / "other.json"
    prof = profile.Profile(Policy(steer=True, peak=2.0), identity(synth.cached_model("gemma3")))
    profile.write(prof, other)
    docs = ROOT / "python" / "engram_llama" / "samples" / "docs"
    one_line_error(_cli("run", model, "q?", "--chunks", str(docs), "--no-chat", "--profile", str(other), env=env),
                   "another model")


def test_the_sealed_evaluation_runs_a_profile_as_run_applies_it():
    """research's "calibrated" condition is with_policy on the engine without a profile: what
    `run` does with that profile found."""
    from research.evaluate import load_presets, settings_of

    conds, presets = load_presets()
    assert presets["sealed"] == ["vanilla", "reorder", "engram", "calibrated"]
    pol = Policy(steer=True, peak=4.0, focus="sentences", reorder=True, edges=1.0)
    assert settings_of(conds["calibrated"], pol) == with_policy(Settings(), pol)
    assert settings_of(conds["engram"], pol) == Settings()   # the hand-tuned defaults stay themselves
    with pytest.raises(ValueError, match="--profile"):
        settings_of(conds["calibrated"], None)
    sealed = json.loads((ROOT / "research" / "sealed.json").read_text())
    assert len(sealed["nq"]) >= 100 and len(sealed["kv"]) >= 100 and sealed["bulletin_seed"] != calibrate.SEED
