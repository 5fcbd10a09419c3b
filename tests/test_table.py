"""The Engram table: build, memory-mapped reading, alias matching, embedding links, bad files."""
import json
import subprocess
import sys

import numpy as np
import pytest

from engram_llama import pointer_map, table
from engram_llama.chunks import Chunk
from engram_llama.extract import Extractor
from engram_llama.starter import curated, synthetic_entries
from engram_llama.table import Entry, Table, TableError

ENTRIES = [
    Entry("PM-KISAN", "scheme", ["PM Kisan", "Kisan Samman Nidhi", "किसान सम्मान निधि"]),
    Entry("Ernakulam", "district", ["Kakkanad"], salience=3.0),
    Entry("State Bank of India", "bank", ["SBI"]),
    Entry("Indore", "city", []),
]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "small.gguf"
    table.build(ENTRIES, p)
    return Table(p)


def test_roundtrip(small):
    assert len(small) == 4
    assert [small.name(i) for i in range(4)] == ["PM-KISAN", "Ernakulam", "State Bank of India", "Indore"]
    assert small.type(0) == "scheme" and small.type(3) == "city"
    assert small.salience(1) == 3.0 and small.salience(0) == table.TYPE_SALIENCE["scheme"]
    assert small.aliases(0) == ["PM-KISAN", "PM Kisan", "Kisan Samman Nidhi", "किसान सम्मान निधि"]
    # embeddings are stored per alias, unit length (float16)
    e = np.asarray(small.embeddings, dtype=np.float32)
    assert e.shape == (9, table.DIM)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=2e-3)


def test_match_whole_words_longest_first(small):
    text = "Under PM Kisan (किसान सम्मान निधि) SBI pays; SBIx and XIndore do not count, Indore does."
    got = [(text[s:e], small.name(k)) for s, e, k in small.match(text)]
    assert got == [("PM Kisan", "PM-KISAN"), ("किसान सम्मान निधि", "PM-KISAN"), ("SBI", "State Bank of India"),
                   ("Indore", "Indore")]


def test_embedding_links_variant_spellings(small):
    # measured cosines (starter table): Ernakulum 0.78, Coimbatur 0.73, Sukanya Samridhi 0.79;
    # unrelated words stay below 0.65
    links = small.link(["Ernakulum", "Kisaan Saman Nidhi", "State Bank of Indya", "completely unrelated"])
    assert [small.name(l[0]) if l else None for l in links] == ["Ernakulam", "PM-KISAN", "State Bank of India", None]
    # Devanagari and its romanisation fold to the same key
    assert table.fold("किसान") == table.fold("Kisaan") == table.fold("kisan")


def test_independent_cosine(small):
    """link() agrees with a direct numpy cosine over the stored alias vectors."""
    q = table.embed(["Ernakulum"])[0]
    e = np.asarray(small.embeddings, dtype=np.float32)
    j = int(np.argmax(e @ q))
    ent, sim = small.link(["Ernakulum"], threshold=0.0)[0]
    assert ent == int(small._t["aliases.entity"][j]) and sim == pytest.approx(float(e[j] @ q), abs=1e-6)


def test_sources_jsonl_and_tsv(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"name": "Jan Dhan", "type": "scheme", "aliases": ["PMJDY"]}) + "\n")
    (tmp_path / "b.tsv").write_text("# comment\nKochi\tcity\tCochin|Kochi city\t2.5\nRupee\t\t\t\n")
    entries = list(table.read_sources([tmp_path / "a.jsonl", tmp_path / "b.tsv"]))
    assert [(e.name, e.type, e.aliases, e.salience) for e in entries] == [
        ("Jan Dhan", "scheme", ["PMJDY"], None), ("Kochi", "city", ["Cochin", "Kochi city"], 2.5),
        ("Rupee", "other", [], None)]
    (tmp_path / "bad.jsonl").write_text('{"type": "city"}\n')
    with pytest.raises(TableError, match="bad.jsonl:1"):
        list(table.read_sources([tmp_path / "bad.jsonl"]))
    with pytest.raises(TableError, match="unknown entity type"):
        table.build([Entry("X", "planet")], tmp_path / "x.gguf")


def test_bad_table_files(tmp_path, small):
    with pytest.raises(TableError, match="not found"):
        Table(tmp_path / "none.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(TableError, match="not a valid table"):
        Table(junk)
    data = small.path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(TableError, match="truncated|not a valid"):
        Table(cut)
    from research import synth
    with pytest.raises(TableError, match="not an engram table"):
        Table(synth.cached_model("llama"))
    # the sizes disagree inside a well-formed file: the embedding values one short of their rows
    import gguf
    r = gguf.GGUFReader(str(small.path))
    w = gguf.GGUFWriter(str(tmp_path / "short.gguf"), table.FORMAT)
    for key in ("version", "dim", "count", "max_tokens"):
        w.add_uint32(f"engram.table.{key}", int(r.get_field(f"engram.table.{key}").contents()))
    w.add_array("engram.table.types", table.TYPES)
    for t in r.tensors:
        data = np.asarray(t.data)
        w.add_tensor(t.name, data[:-1] if t.name == "embeddings.vals" else data)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(TableError, match="inconsistent sizes"):
        Table(tmp_path / "short.gguf")
    # another format version
    w = gguf.GGUFWriter(str(tmp_path / "v9.gguf"), table.FORMAT)
    w.add_uint32("engram.table.version", 9)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(TableError, match="format version 9"):
        Table(tmp_path / "v9.gguf")


def test_pointer_map_follows_aliases_across_scripts(small):
    chunks = [Chunk(0, "a", "किसान सम्मान निधि gives ₹6,000 a year."), Chunk(1, "b", "Indore has a big SBI branch."),
              Chunk(2, "c", "Nothing relevant here.")]
    q = "What does PM Kisan give?"
    ex = Extractor(quiet=True, table=small)
    ents = ex([q] + [c.text for c in chunks])
    assert any(e.ent == 0 for e in ents[0])
    pm = pointer_map.build(ents[0], chunks, ents[1:], small)
    assert pm.hits == {0: {"#0": [(0, 17)]}}
    # weight = table salience x corpus idf
    assert pm.idf["#0"] == pytest.approx(2.0 * np.log(1 + (3 - 1 + 0.5) / 1.5))


def test_question_entity_linked_by_embedding(small):
    ex = Extractor(quiet=True, table=small)
    q = ex(["Where is the Ernakulum district office?"])[0]
    assert [(e.text, e.ent) for e in q if e.ent >= 0] == [("Ernakulum", 1)]


def test_curated_lists_and_synthetic_generator():
    cur = list(curated())
    assert len(cur) >= 150 and {e.type for e in cur} >= {"scheme", "bank", "financial_term", "hindi_phrase"}
    a = [e.name for e in synthetic_entries(2000, seed=1)]
    assert len(a) == len(set(a)) == 2000 and a == [e.name for e in synthetic_entries(2000, seed=1)]


def test_cli_table_build_and_info(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"name": "Ujjwala", "type": "scheme"}) + "\n")
    out = tmp_path / "t.gguf"
    r = subprocess.run([sys.executable, "-m", "engram_llama.cli", "table", "build", str(src), "--synthetic", "500",
                        "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "engram_llama.cli", "table", "info", str(out), "--json"],
                       capture_output=True, text=True)
    info = json.loads(r.stdout)
    assert info["entities"] == 501 and info["types"]["scheme"] >= 1
    r = subprocess.run([sys.executable, "-m", "engram_llama.cli", "table", "info", str(src)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a valid table" in r.stderr


def _brute_match(tab, text):
    """Reference matcher: every alias compared with every token run of the text, longest first."""
    toks = table.match_tokens(text)
    words = [w for _, _, w in toks]
    n_alias = len(tab._t["aliases.entity"])
    keys = {}
    for j in range(n_alias):  # the first alias of a repeated key wins
        a = tuple(w for _, _, w in table.match_tokens(tab._str(tab._t["aliases.bytes"], tab._t["aliases.offsets"], j)))
        keys.setdefault(a, int(tab._t["aliases.entity"][j]))
    found = [(toks[i][0], toks[i + n - 1][1], keys[tuple(words[i:i + n])])
             for n in range(1, len(words) + 1) for i in range(len(words) - n + 1) if tuple(words[i:i + n]) in keys]
    found.sort(key=lambda x: (x[0], -(x[1] - x[0])))
    out, last = [], -1
    for s, e, k in found:
        if s >= last:
            out.append((s, e, k))
            last = e
    return out


def test_match_agrees_with_brute_force(tmp_path):
    import random

    entries = list(synthetic_entries(300, seed=3)) + ENTRIES + [Entry("Bank", "other", []), Entry("India", "place", [])]
    table.build(entries, tmp_path / "s.gguf")
    tab = Table(tmp_path / "s.gguf")
    rng = random.Random(0)
    vocab = [a for e in entries for a in [e.name] + e.aliases] + ["the", "of", "-", ",", "रुपये", "Bankx", "x"]
    for _ in range(40):
        text = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 25)))
        text = text.replace(" , ", ", ") if rng.random() < 0.5 else text.upper()
        assert tab.match(text) == _brute_match(tab, text), text


def test_link_agrees_with_dense_product(tmp_path):
    entries = list(synthetic_entries(500, seed=4)) + ENTRIES
    table.build(entries, tmp_path / "l.gguf")
    tab = Table(tmp_path / "l.gguf")
    names = ["Ernakulum", "Kisaan", "Ramapur", "Shriganj Yojna", "zzzz", "Indorre"]
    q = table.embed(names)
    e = np.asarray(tab.embeddings, dtype=np.float32)
    sims = e @ q.T
    for i, got in enumerate(tab.link(names, threshold=-1.0)):
        j = int(np.argmax(sims[:, i]))
        assert got[1] == pytest.approx(float(sims[j, i]), abs=1e-5)
        assert got[0] == int(tab._t["aliases.entity"][j]) or sims[:, i].max() - np.sort(sims[:, i])[-2] < 1e-5


def test_match_many_equals_match_per_text(small):
    texts = ["SBI and PM Kisan", "", "Indore", "Kisan Samman", "Nidhi Indore SBI SBI"]
    assert small.match_many(texts) == [small.match(t) for t in texts]
    # an alias may not be found across two texts ("Kisan Samman" + "Nidhi")
    assert small.match_many(["Kisan Samman", "Nidhi"]) == [[], []]
