"""engram-llama command line: a thin layer over the library (llama.cpp flag conventions)."""
from __future__ import annotations

import argparse
import json
import sys


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _load_model(path: str, n_gpu_layers: int = 0, vocab_only: bool = False):
    from .gguf_check import check_gguf
    from .lowlevel import Model

    check_gguf(path)
    try:
        return Model(path, n_gpu_layers=n_gpu_layers, vocab_only=vocab_only)
    except RuntimeError as e:
        raise UsageError(f"llama.cpp could not load {path}: {e}") from None


def cmd_inspect(args) -> int:
    from ._hook import LayerKind, layer_kinds
    from .gguf_check import architecture

    model = _load_model(args.model)
    kinds = layer_kinds(model.ptr)
    arch = architecture(args.model)
    groups = {k: [il for il, kk in enumerate(kinds) if kk == k] for k in LayerKind if k != LayerKind.INVALID}
    if args.json:
        print(json.dumps({
            "model": args.model, "architecture": arch, "n_layer": len(kinds),
            "layers": [k.name.lower() for k in kinds],
            "biasable": groups[LayerKind.FULL] + groups[LayerKind.SWA],
        }))
        return 0
    print(f"model:        {args.model}")
    print(f"architecture: {arch}, {len(kinds)} layers")
    print(f"full attention (biasable):      {_ranges(groups[LayerKind.FULL]) or '-'}")
    print(f"sliding window (biasable):      {_ranges(groups[LayerKind.SWA]) or '-'}")
    print(f"no softmax attention (refused): {_ranges(groups[LayerKind.NONE]) or '-'}")
    return 0


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="engram-llama", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="print the architecture and which layers can take a bias")
    p.add_argument("model", help="GGUF model file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        from . import EngramImportError  # noqa: F401  (binds the patched libllama)
        from .gguf_check import ModelFileError
    except ImportError as e:
        print(f"engram-llama: {e}", file=sys.stderr)
        return 1
    try:
        return args.func(args)
    except (UsageError, ModelFileError) as e:
        print(f"engram-llama: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("engram-llama: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
