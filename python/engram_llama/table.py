"""Level 1, the Engram table: known entities with aliases, a type, a salience prior and an
embedding, stored as one GGUF file and memory-mapped, so a large table opens at once and costs
RAM only where it is touched.

The embeddings are character-trigram vectors of a transliteration-folded form of the entity's
names. They are what links a spelling the table does not list (a typo, another romanisation, the
Devanagari form) to its entity: exact alias matching finds "Ernakulam", the embedding links
"Ernakulum" or "एर्णाकुलम" to it.
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

FORMAT = "engram-table"
FORMAT_VERSION = 2  # 2: token-hash match index, embeddings stored by dimension (sparse)
DIM = 128
TYPES = ["other", "person", "place", "state", "district", "city", "organisation", "scheme", "bank",
         "financial_term", "hindi_phrase"]
# how informative a match of each type is, before corpus statistics (pointer_map multiplies it
# with the inverse document frequency over the chunks)
TYPE_SALIENCE = {"scheme": 2.0, "bank": 1.5, "financial_term": 1.2, "hindi_phrase": 1.2, "district": 1.5,
                 "city": 1.3, "state": 1.0, "place": 1.2, "organisation": 1.5, "person": 1.5, "other": 1.0}


class TableError(Exception):
    pass


@dataclass
class Entry:
    name: str
    type: str = "other"
    aliases: list[str] = field(default_factory=list)
    salience: float | None = None


# --- names: folding and embedding ------------------------------------------------------------

def _deva_to_latin(s: str) -> str:
    if not any("\u0900" <= ch <= "\u097f" for ch in s):
        return s
    try:
        from indic_transliteration import sanscript
        from indic_transliteration.sanscript import transliterate
    except ImportError:
        return s
    out = []
    for w in s.split():
        t = transliterate(w, sanscript.DEVANAGARI, sanscript.IAST)
        # Hindi drops the inherent vowel of a word-final consonant: किसान is "kisan", not "kisāna"
        if ("\u0915" <= w[-1] <= "\u0939" or "\u0958" <= w[-1] <= "\u095f") and t.endswith("a"):
            t = t[:-1]
        out.append(t)
    return " ".join(out)


_FOLDS = [(r"aa+", "a"), (r"ee+", "i"), (r"oo+", "u"), (r"w", "v"), (r"ph", "f"), (r"([a-z])\1", r"\1"),
          (r"sh", "s"), (r"th", "t"), (r"dh", "d"), (r"bh", "b"), (r"kh", "k"), (r"gh", "g"), (r"ch", "c")]


def fold(s: str) -> str:
    """A spelling-tolerant key: Devanagari transliterated, accents dropped, common romanisation
    variants merged ("Kisaan"/"Kisan", "Ernakulum"/"Ernakulam" stay close, not equal)."""
    s = _deva_to_latin(s)
    s = unicodedata.normalize("NFKD", s)
    s = "".join(ch for ch in s if not unicodedata.combining(ch)).lower()
    s = re.sub(r"[^a-z0-9]+", " ", s).strip()
    for pat, rep in _FOLDS:
        s = re.sub(pat, rep, s)
    return s


def embed(names: Iterable[str]) -> np.ndarray:
    """Signed-hash character-trigram vectors of fold(name), L2-normalised, float32 [n, DIM]."""
    names = list(names)
    out = np.zeros((len(names), DIM), dtype=np.float32)
    for i, n in enumerate(names):
        f = f"  {fold(n)}  "
        for j in range(len(f) - 2):
            h = zlib.crc32(f[j:j + 3].encode())
            out[i, h % DIM] += 1.0 if (h >> 16) & 1 else -1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def match_key(s: str) -> str:
    """Exact-match form of an alias: lower case, single spaces."""
    return re.sub(r"\s+", " ", s.lower()).strip()


# Aliases are matched as whole token sequences (words, Devanagari runs, single punctuation
# marks; spacing ignored): every token sequence of the text up to the longest alias is hashed
# with a rolling 64-bit hash and looked up in the table's sorted hash array, which is memory-
# mapped, so a 135K-entity table needs no index built at load time.
_TOKEN = re.compile(r"[\w\u0900-\u097F]+|[^\w\s]")
_P = np.uint64(0x100000001B3)


def match_tokens(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group().lower()) for m in _TOKEN.finditer(text)]


def _token_hashes(words: list[str], memo: dict[str, int] | None = None) -> np.ndarray:
    import hashlib

    memo = {} if memo is None else memo
    out = np.empty(len(words), dtype=np.uint64)
    for i, w in enumerate(words):
        h = memo.get(w)
        if h is None:
            h = memo[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
        out[i] = h
    return out


def _ngram_hashes(th: np.ndarray, n: int) -> np.ndarray:
    """Rolling hash of every run of n consecutive token hashes (wrapping uint64 arithmetic)."""
    m = len(th) - n + 1
    h = th[:m].copy()
    for k in range(1, n):
        h *= _P
        h += th[k:k + m]
    return h


def _alias_hash(alias: str, memo: dict[str, int]) -> tuple[int, int]:
    words = [w for _, _, w in match_tokens(alias)]
    if not words:
        return 0, 0
    return int(_ngram_hashes(_token_hashes(words, memo), len(words))[0]), len(words)


# --- building ----------------------------------------------------------------------------------

def _blob(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    enc = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(enc) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in enc], out=offsets[1:])
    data = np.frombuffer(b"".join(enc), dtype=np.uint8) if enc else np.zeros(0, np.uint8)
    return data.view(np.int8).copy(), offsets  # gguf stores I8, not U8: same bytes


def build(entries: Iterable[Entry], path: str | os.PathLike, progress=None) -> Path:
    """Write a table file (atomically). Aliases include the name; duplicates are dropped."""
    names, types, sal, aliases, alias_ent = [], [], [], [], []
    for e in entries:
        if e.type not in TYPES:
            raise TableError(f"unknown entity type {e.type!r} for {e.name!r} (known: {', '.join(TYPES)})")
        name = e.name.strip()
        if not name:
            continue
        idx = len(names)
        names.append(name)
        types.append(TYPES.index(e.type))
        s = e.salience if e.salience is not None else TYPE_SALIENCE[e.type]
        if not np.isfinite(s) or s < 0:
            raise TableError(f"salience of {name!r} must be a non-negative number")
        sal.append(s)
        seen = set()
        for a in [name] + list(e.aliases):
            k = match_key(a)
            if len(k) >= 2 and k not in seen:
                seen.add(k)
                aliases.append(a.strip())
                alias_ent.append(idx)
        if progress and idx % 10000 == 0:
            progress(idx)
    if not names:
        raise TableError("no entities to write")
    # one vector per alias, so a spelling is compared with each listed spelling of the entity
    # rather than with a blur of all of them
    emb = np.concatenate([embed(aliases[a:a + 50000]) for a in range(0, len(aliases), 50000)])
    memo: dict[str, int] = {}
    hashes = [_alias_hash(a, memo) for a in aliases]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write(tmp, names, types, sal, aliases, alias_ent, emb, hashes)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing half-written is left behind
        raise
    return path


def _write(tmp: Path, names, types, sal, aliases, alias_ent, emb, hashes) -> None:
    import gguf

    # match index: alias hashes sorted, the first alias of a repeated key kept (it wins, as the
    # entity listed first)
    h = np.array([x for x, _ in hashes], dtype=np.uint64)
    n_tok = np.array([n for _, n in hashes], dtype=np.int32)
    order = np.argsort(h, kind="stable")
    keep = order[n_tok[order] > 0]
    first = np.ones(len(keep), dtype=bool)
    first[1:] = h[keep][1:] != h[keep][:-1]
    keep = keep[first]
    # embeddings by dimension: a trigram vector has ~10 of its 128 entries set, so a query
    # touches a few columns instead of the whole matrix
    d_idx, rows = np.nonzero(emb.T)
    ptr = np.zeros(DIM + 1, dtype=np.int64)
    np.cumsum(np.bincount(d_idx, minlength=DIM), out=ptr[1:])

    w = gguf.GGUFWriter(str(tmp), FORMAT)
    w.add_uint32("engram.table.version", FORMAT_VERSION)
    w.add_uint32("engram.table.dim", DIM)
    w.add_uint32("engram.table.count", len(names))
    w.add_uint32("engram.table.max_tokens", int(n_tok.max()))
    w.add_array("engram.table.types", TYPES)
    nb, no = _blob(names)
    ab, ao = _blob(aliases)
    w.add_tensor("names.bytes", nb)
    w.add_tensor("names.offsets", no)
    w.add_tensor("aliases.bytes", ab)
    w.add_tensor("aliases.offsets", ao)
    w.add_tensor("aliases.entity", np.asarray(alias_ent, dtype=np.int32))
    w.add_tensor("types", np.asarray(types, dtype=np.int8))
    w.add_tensor("salience", np.asarray(sal, dtype=np.float32))
    w.add_tensor("embeddings.ptr", ptr)
    w.add_tensor("embeddings.rows", rows.astype(np.int32))
    w.add_tensor("embeddings.vals", emb.T[d_idx, rows].astype(np.float16))
    w.add_tensor("match.hash", h[keep].view(np.int64))
    w.add_tensor("match.alias", keep.astype(np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_sources(paths: Iterable[str | os.PathLike]) -> Iterator[Entry]:
    """Entries from JSONL ({"name", "type", "aliases", "salience"}) or TSV (name, type,
    aliases separated by |, salience) files."""
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise TableError(f"source not found: {p}")
        try:
            lines = [x.rstrip("\r") for x in p.read_text(encoding="utf-8-sig").split("\n")]  # JSON text may hold U+2028
        except (OSError, UnicodeDecodeError) as e:
            raise TableError(f"cannot read {p}: {e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip() or line.startswith("#"):
                continue
            try:
                if p.suffix == ".jsonl":
                    d = json.loads(line)
                    yield Entry(d["name"], d.get("type", "other"), list(d.get("aliases", [])), d.get("salience"))
                else:
                    cols = line.rstrip("\n").split("\t")
                    yield Entry(cols[0], cols[1] if len(cols) > 1 and cols[1] else "other",
                                [a for a in cols[2].split("|") if a] if len(cols) > 2 else [],
                                float(cols[3]) if len(cols) > 3 and cols[3] else None)
            except (ValueError, KeyError, TypeError) as e:
                raise TableError(f"{p}:{n}: bad entry ({type(e).__name__}: {e})") from None


# --- reading -----------------------------------------------------------------------------------

class Table:
    """A table file, memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        if not self.path.exists():
            raise TableError(f"table file not found: {self.path}")
        try:
            r = gguf.GGUFReader(str(self.path), "r")
        except Exception as e:
            raise TableError(f"{self.path} is not a valid table file ({type(e).__name__})") from None
        arch = r.get_field("general.architecture")
        if arch is None or arch.contents() != FORMAT:
            raise TableError(f"{self.path} is not an engram table (it is a GGUF of another kind)")
        ver = r.get_field("engram.table.version")
        if ver is None or ver.contents() != FORMAT_VERSION:
            got = ver.contents() if ver is not None else "none"
            raise TableError(f"{self.path} has table format version {got}; this engram-llama reads version {FORMAT_VERSION} (rebuild it)")
        t = {x.name: x for x in r.tensors}
        need = ["names.bytes", "names.offsets", "aliases.bytes", "aliases.offsets", "aliases.entity", "types", "salience",
                "embeddings.ptr", "embeddings.rows", "embeddings.vals", "match.hash", "match.alias"]
        missing = [k for k in need if k not in t]
        if missing:
            raise TableError(f"{self.path} is corrupt: missing {', '.join(missing)}")
        size = self.path.stat().st_size
        for x in t.values():
            if x.data_offset + x.n_bytes > size:
                raise TableError(f"{self.path} is truncated")
        self._t = {k: t[k].data for k in need}
        self.types = list(r.get_field("engram.table.types").contents())
        self.n = int(r.get_field("engram.table.count").contents())
        self.dim = int(r.get_field("engram.table.dim").contents())
        self.max_tokens = int(r.get_field("engram.table.max_tokens").contents())
        self._hash = self._t["match.hash"].view(np.uint64)
        t = self._t
        if (len(t["types"]) != self.n or self.dim != DIM or len(t["embeddings.ptr"]) != DIM + 1
                or not int(t["embeddings.ptr"][-1]) == len(t["embeddings.rows"]) == len(t["embeddings.vals"])
                or len(t["match.hash"]) != len(t["match.alias"])):
            raise TableError(f"{self.path} is corrupt: inconsistent sizes")

    def __len__(self) -> int:
        return self.n

    @staticmethod
    def _str(data, offsets, i) -> str:
        return bytes(data[int(offsets[i]):int(offsets[i + 1])]).decode("utf-8")

    def name(self, i: int) -> str:
        return self._str(self._t["names.bytes"], self._t["names.offsets"], i)

    def type(self, i: int) -> str:
        return self.types[int(self._t["types"][i])]

    def salience(self, i: int) -> float:
        return float(self._t["salience"][i])

    def aliases(self, i: int) -> list[str]:
        ent = self._t["aliases.entity"]
        idx = np.nonzero(ent == i)[0]
        return [self._str(self._t["aliases.bytes"], self._t["aliases.offsets"], j) for j in idx]

    @property
    def embeddings(self) -> np.ndarray:
        """The alias vectors as a dense [n_aliases, dim] float16 matrix (built on request; linking
        reads the sparse columns)."""
        t = self._t
        e = np.zeros((len(t["aliases.entity"]), self.dim), dtype=np.float16)
        ptr = t["embeddings.ptr"]
        for d in range(self.dim):
            e[t["embeddings.rows"][ptr[d]:ptr[d + 1]], d] = t["embeddings.vals"][ptr[d]:ptr[d + 1]]
        return e

    # matching --------------------------------------------------------------------------------

    def match(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, entity) of alias occurrences in text: whole tokens, longest first, no overlaps."""
        return self.match_many([text])[0]

    def match_many(self, texts: list[str]) -> list[list[tuple[int, int, int]]]:
        """match() of each text, with one lookup per n-gram length for all of them."""
        toks = [match_tokens(t) for t in texts]
        flat = [x for tt in toks for x in tt]
        doc = np.repeat(np.arange(len(texts)), [len(tt) for tt in toks])
        words = [w for _, _, w in flat]
        th = _token_hashes(words)
        table_h = np.asarray(self._hash)
        alias_of = np.asarray(self._t["match.alias"])
        found: list[list[tuple[int, int, int]]] = [[] for _ in texts]
        for n in range(1, min(self.max_tokens, len(flat)) + 1):
            h = _ngram_hashes(th, n)
            idx = np.searchsorted(table_h, h)
            idx[idx == len(table_h)] = 0
            hit = np.nonzero((table_h[idx] == h) & (doc[:len(h)] == doc[n - 1:]))[0]  # within one text
            for i in hit:
                j = int(alias_of[idx[i]])
                alias = self._str(self._t["aliases.bytes"], self._t["aliases.offsets"], j)
                if [w for _, _, w in match_tokens(alias)] == words[i:i + n]:  # not a hash collision
                    found[doc[i]].append((flat[i][0], flat[i + n - 1][1], int(self._t["aliases.entity"][j])))
        out = []
        for f in found:
            f.sort(key=lambda x: (x[0], -(x[1] - x[0])))
            kept, last = [], -1
            for s_, e, ent in f:
                if s_ >= last:
                    kept.append((s_, e, ent))
                    last = e
            out.append(kept)
        return out

    def link(self, names: list[str], threshold: float = 0.7) -> list[tuple[int, float] | None]:
        """The table entity whose nearest alias is closest to each name by embedding (cosine of
        trigram vectors), when that similarity reaches threshold."""
        if not names:
            return []
        q = embed(names)
        t = self._t
        ent, ptr, rows, vals = t["aliases.entity"], t["embeddings.ptr"], t["embeddings.rows"], t["embeddings.vals"]
        best = np.zeros(len(names), dtype=np.float32)
        arg = np.zeros(len(names), dtype=np.int64)
        sims = np.empty(len(ent), dtype=np.float32)
        for i in range(len(names)):
            sims.fill(0.0)
            for d in np.nonzero(q[i])[0]:
                a, b = ptr[d], ptr[d + 1]
                sims[rows[a:b]] += q[i, d] * vals[a:b].astype(np.float32)  # rows of a column are distinct
            arg[i] = int(np.argmax(sims))
            best[i] = sims[arg[i]]
        return [(int(ent[arg[i]]), float(best[i])) if best[i] >= threshold else None for i in range(len(names))]
