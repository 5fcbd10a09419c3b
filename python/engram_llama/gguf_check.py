"""Checks a model file before llama.cpp opens it, so a bad file gets a sentence, not an abort, and
names the file's identity (what a calibrated profile is keyed by).

The header is walked with struct on a memory map rather than gguf-py's reader, which builds a
numpy field per vocabulary entry (2.7 s on SmolLM2's header, 13.6 s on Gemma 3's; this: ~0.1 s).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path


class ModelFileError(Exception):
    pass


# llama.cpp architectures that do not write text token by token from a causal prompt: encoder-decoder
# (T5: the documents would go to the encoder, where the bias never reaches), encoders and embedding
# models, diffusion language models (src/llama-arch.cpp of the pinned llama.cpp)
NOT_CAUSAL_LM = {"t5", "t5encoder", "bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert",
                 "jina-bert-v2", "jina-bert-v3", "eurobert", "dream", "llada", "llada-moe"}

# GGUF value types: their struct codes (8: string, 9: array)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class Header:
    version: int
    metadata: dict            # scalar and string values (arrays: their length only)
    tensors: list             # (name, shape, ggml type, offset from the data section)
    data_offset: int          # where the tensor data starts: the header is everything before it


def read_header(path: str | os.PathLike) -> Header:
    """The GGUF header; ValueError/struct.error/IndexError on a corrupt one."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            v = struct.unpack_from("<" + fmt, m, pos)
            pos += struct.calcsize("<" + fmt)
            return v[0]

        def string() -> str:
            nonlocal pos
            n = take("Q")
            if pos + n > len(m):
                raise ValueError("a string runs past the end of the file")
            s = m[pos:pos + n].decode("utf-8", "replace")
            pos += n
            return s

        def value(t: int):
            nonlocal pos
            if t in _SCALAR:
                return take(_SCALAR[t])
            if t == 8:
                return string()
            if t == 9:
                et, n = take("I"), take("Q")
                if et == 8:
                    for _ in range(n):  # skip each string by its length
                        pos += 8 + struct.unpack_from("<Q", m, pos)[0]
                elif et in _SCALAR:
                    pos += n * struct.calcsize("<" + _SCALAR[et])
                else:
                    for _ in range(n):
                        value(et)
                if pos > len(m):
                    raise ValueError("an array runs past the end of the file")
                return n
            raise ValueError(f"unknown value type {t}")

        if m[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        pos = 4
        version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
        if version not in (2, 3) or n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise ValueError(f"unsupported GGUF version {version} or implausible counts")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("I"))
        tensors = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("I")
            if n_dims > 8:  # GGML_MAX_DIMS is 4
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            shape = tuple(take("Q") for _ in range(n_dims))
            tensors.append((name, shape, take("I"), take("Q")))
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment {align!r} is not a power of two")
        return Header(version, meta, tensors, -(-pos // align) * align)


def _n_bytes(shape: tuple, ggml_type: int) -> int:
    """The tensor's bytes; 0 for a type this gguf-py does not know (llama.cpp will judge it)."""
    import gguf

    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return 0
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def check_gguf(path: str | os.PathLike) -> Path:
    """Raise ModelFileError unless path is a readable, complete GGUF file."""
    header(path)
    return Path(path)


def header(path: str | os.PathLike) -> Header:
    """The checked header of a readable, complete GGUF file of a causal language model;
    ModelFileError otherwise."""
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
        h = read_header(p)
        size = p.stat().st_size
        for name, shape, t, off in h.tensors:
            if h.data_offset + off + _n_bytes(shape, t) > size:
                raise ModelFileError(f"{p} is truncated: tensor {name} ends past the end of the file")
    except ModelFileError:
        raise
    except struct.error:
        raise ModelFileError(f"{p} is truncated: its header runs past the end of the file") from None
    except Exception as e:  # a corrupt header: struct.error, ValueError, IndexError, KeyError
        raise ModelFileError(f"{p} is not a valid GGUF file ({type(e).__name__}: {e})") from None
    arch = h.metadata.get("general.architecture")
    if arch in NOT_CAUSAL_LM:
        raise ModelFileError(f"{p} is a {arch} model: engram-llama steers causal (decoder-only) language models")
    return h


def architecture(path: str | os.PathLike) -> str:
    return str(read_header(path).metadata.get("general.architecture", "unknown"))


def identity(path: str | os.PathLike) -> dict:
    """What a profile is keyed by: the architecture, the layer count, the file's size and the
    SHA-256 of its header (metadata and every tensor's name, shape and type), so another
    quantisation or fine-tune of the same architecture is another model; cheap on a 2 GB file."""
    h = header(path)
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read(h.data_offset)).hexdigest()
    except OSError as e:
        raise ModelFileError(f"cannot read model file {path}: {e.strerror}") from None
    arch = str(h.metadata.get("general.architecture", "unknown"))
    n_layer = h.metadata.get(f"{arch}.block_count", 0)
    return {"architecture": arch, "n_layer": n_layer if isinstance(n_layer, int) else 0,
            "size": Path(path).stat().st_size, "header_sha256": digest}
