"""Checks a model file before llama.cpp opens it, so a bad file gets a sentence, not an abort."""
from __future__ import annotations

import os
from pathlib import Path


class ModelFileError(Exception):
    pass


def check_gguf(path: str | os.PathLike) -> Path:
    """Raise ModelFileError unless path is a readable, complete GGUF file."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelFileError(f"model path is a directory, not a GGUF file: {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"cannot read model file {p}: {e.strerror}") from None
    if magic != b"GGUF":
        raise ModelFileError(f"{p} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        import gguf

        reader = gguf.GGUFReader(str(p), "r")
        size = p.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ModelFileError(f"{p} is truncated: tensor {t.name} ends past the end of the file")
    except ModelFileError:
        raise
    except Exception as e:  # gguf-py raises plain ValueError/IndexError on corrupt headers
        raise ModelFileError(f"{p} is not a valid GGUF file ({type(e).__name__}: {e})") from None
    return p


def architecture(path: str | os.PathLike) -> str:
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    field = reader.get_field("general.architecture")
    return field.contents() if field is not None else "unknown"
