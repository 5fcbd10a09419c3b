#!/usr/bin/env python3
"""Embedding-link similarities on the starter table (quoted in docs/PIPELINE.md).

    .venv/bin/python scripts/link_figures.py
"""
import engram_llama  # noqa: F401
from engram_llama.cli import default_table_path
from engram_llama.table import Table

PROBES = [  # (spelling not listed verbatim, expected entity or None)
    ("Ernakulum", "Ernakulam"), ("Coimbatur", "Coimbatore"), ("Sukanya Samridhi", "Sukanya Samriddhi Yojana"),
    ("Pradhan Mantri Kisaan Samman Nidhi", "PM-KISAN"), ("Ayushmaan Bharat", "Ayushman Bharat PM-JAY"),
    ("वाराणसी", "Varanasi"), ("Dehra Dun", "Dehradun"), ("Bengaluru", "Bengaluru"),
    ("completely unrelated words", None), ("question", None), ("Which district", None), ("annual benefit", None),
]

t = Table(default_table_path())
print(f"{'spelling':38} {'nearest entity':28} cosine  expected")
for s, want in PROBES:
    ent, sim = t.link([s], threshold=-1.0)[0]
    print(f"{s:38} {t.name(ent):28} {sim:6.3f}  {want or '-'}")
