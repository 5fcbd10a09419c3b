"""Documents in, chunks out: the unit that relevance scores and the bias covers."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOC_SUFFIXES = (".txt", ".md")


class DocsError(Exception):
    pass


@dataclass(frozen=True)
class Chunk:
    id: int
    source: str
    text: str


def read_docs(folder: str | Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(name, text) of the .txt/.md files of folder (or of a .jsonl file's lines), and notes on
    what was skipped."""
    root = Path(folder)
    if not root.exists():
        raise DocsError(f"{'documents file' if root.suffix.lower() == '.jsonl' else 'docs folder'} not found: {root}")
    if root.is_file() and root.suffix.lower() == ".jsonl":
        return read_jsonl(root)
    if not root.is_dir():
        raise DocsError(f"not a folder or a .jsonl file: {root}")
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file())
    except OSError as e:
        raise DocsError(f"cannot read docs folder {root}: {e.strerror}") from None
    docs, notes = [], []
    for p in files:
        rel = str(p.relative_to(root))
        if p.suffix.lower() not in DOC_SUFFIXES:
            notes.append(f"skipped {rel}: not .txt or .md")
            continue
        try:
            raw = p.read_bytes()
        except OSError as e:
            notes.append(f"skipped {rel}: {e.strerror}")
            continue
        if b"\x00" in raw:
            notes.append(f"skipped {rel}: binary content")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            notes.append(f"skipped {rel}: not UTF-8 text")
            continue
        if text.strip():
            docs.append((rel, text))
        else:
            notes.append(f"skipped {rel}: empty")
    if not docs:
        raise DocsError(f"no readable .txt or .md documents in {root}" + (f" ({'; '.join(notes[:3])})" if notes else ""))
    return docs, notes


def read_jsonl(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Documents as JSON lines, {"title": ..., "text": ...} ("id" names one without a title), in
    the file's order: what a retriever hands over, with its order kept."""
    import json

    try:
        lines = [x.rstrip("\r") for x in path.read_text(encoding="utf-8-sig").split("\n")]  # JSON text may hold U+2028
    except (OSError, UnicodeDecodeError) as e:
        raise DocsError(f"cannot read {path}: {getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None
    docs, notes = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            text = d["text"]
            if not isinstance(text, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise DocsError(f"{path}:{n}: not a JSON object with a \"text\" string") from None
        name = str(d.get("title") or d.get("id") or f"document {len(docs) + 1}")
        if text.strip():
            docs.append((name, text))
        else:
            notes.append(f"skipped line {n} of {path.name}: empty text")
    if not docs:
        raise DocsError(f"no documents in {path}")
    return docs, notes


def split(docs: list[tuple[str, str]], max_chars: int = 800) -> list[Chunk]:
    """Paragraph chunks, merged up to max_chars, long paragraphs cut at sentence ends."""
    chunks: list[Chunk] = []
    for name, text in docs:
        paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        pieces: list[str] = []
        for p in paras:
            i = 0  # walked by offset: slicing the rest off each time is quadratic on one huge paragraph
            while len(p) - i > max_chars:
                cut = max((m.end() for m in re.finditer(r"[.!?।]\s", p[i:i + max_chars])), default=max_chars)
                pieces.append(p[i:i + cut].strip())
                i += cut
                while i < len(p) and p[i].isspace():
                    i += 1
            if p[i:]:
                pieces.append(p[i:])
        buf = ""
        for piece in pieces:
            if buf and len(buf) + 2 + len(piece) > max_chars:
                chunks.append(Chunk(len(chunks), name, buf))
                buf = piece
            else:
                buf = f"{buf}\n\n{piece}" if buf else piece
        if buf:
            chunks.append(Chunk(len(chunks), name, buf))
    return chunks
