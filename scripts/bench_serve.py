#!/usr/bin/env python3
"""Load on `engram-llama serve` against llama-cpp-python's own server, side by side in one run.

Both servers run the same GGUF on a free loopback port, one after the other. C clients each send
R chat requests in a row (greedy, M answer tokens) over the shipped sample documents (~1.4K
prompt tokens with SmolLM2), the question rotating through a list: to engram-llama in the
`documents` field (steered), to llama-cpp-python's server inlined in the user message as
engram-llama renders them (not steered). Reported per server: requests, errors, p50/p95 latency,
throughput; the run stops by itself.

    .venv/bin/python scripts/bench_serve.py                          # 8 clients x 25 requests
    .venv/bin/python scripts/bench_serve.py --clients 4 --requests 5  # a quick look
    .venv/bin/python scripts/bench_serve.py --nq --clients 4 --requests 3   # ~2K tokens, no reuse
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "How much money does a farmer family get each year under PM-KISAN?",
    "What is the health cover per family under Ayushman Bharat?",
    "How many days of work does MGNREGA guarantee to a rural household?",
    "Which district has its headquarters at Kakkanad?",
    "Who can open an account under the Sukanya Samriddhi Yojana?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench_serve: the server exited ({proc.args[:4]})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("bench_serve: a server did not come up")


def load(url: str, bodies, clients: int, requests: int) -> dict:
    import httpx

    lat, errors = [], 0

    def client(k: int):
        nonlocal errors
        with httpx.Client(timeout=600) as h:
            for i in range(requests):
                body = bodies[(k * requests + i) % len(bodies)]
                t0 = time.perf_counter()
                try:
                    r = h.post(url, json=body)
                    ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
                except httpx.HTTPError:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(client, range(clients)))
    wall = time.perf_counter() - t0
    lat.sort()
    return {"n": len(lat) + errors, "errors": errors, "p50": statistics.median(lat) if lat else float("nan"),
            "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan"), "rps": len(lat) / wall,
            "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("-np", "--parallel", type=int, default=1, help="engram-llama's slots")
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("--nq", action="store_true",
                    help="a different document set per request: an NQ question with 15 passages (~2K tokens; "
                         "../shared/data, the file's last items), nothing to reuse")
    args = ap.parse_args()

    from engram_llama import align, lib_path
    from engram_llama.chunks import read_docs, split
    from engram_llama.cli import default_docs, default_model

    model = args.model or default_model()
    if args.nq:  # (a speed figure: the answers are not judged)
        from research import datasets

        items = datasets.nq(ROOT.parent / "shared" / "data" / "nq-open-dev.jsonl.gz", 15)
        sets = [(it.question, split([it.gold] + it.distractors)) for it in items[-args.clients * args.requests:]]
    else:
        chunks = split(read_docs(default_docs())[0])
        sets = [(q, chunks) for q in QUESTIONS]
    ours, inline = [], []
    for q, chunks in sets:
        docs = [{"id": str(c.id), "title": c.source, "text": c.text} for c in chunks]
        ours.append({"messages": [{"role": "user", "content": q}], "documents": docs,
                     "max_tokens": args.max_tokens, "temperature": 0})
        # the same prompt text, the documents inlined as engram-llama renders them
        text, _, _ = align.render(chunks, [c.id for c in chunks], q, None)
        content = text[:text.rfind("\n")]  # the plain prompt without its answer prefix
        inline.append({"messages": [{"role": "user", "content": content}], "max_tokens": args.max_tokens,
                       "temperature": 0})
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(Path(lib_path()).parent))  # one libllama: the patched one
    runs = [
        ("engram-llama serve (steered)", ours,
         [sys.executable, "-m", "engram_llama.cli", "serve", model, "-np", str(args.parallel), "-c", str(args.ctx_size)]),
        ("llama-cpp-python server (not steered)", inline,
         [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_ctx", str(args.ctx_size)]),
    ]
    print(f"model {Path(model).name}, {args.clients} clients x {args.requests} requests, {args.max_tokens} answer tokens, "
          + (f"a different NQ set of 15 passages per request\n" if args.nq else f"{len(sets[0][1])} chunks\n"))
    print("| server | requests | errors | p50 latency | p95 latency | throughput |")
    print("|---|---|---|---|---|---|")
    results = []
    for name, bodies, cmd in runs:
        port = free_port()
        cmd = cmd + ["--port", str(port)] + (["--host", "127.0.0.1"] if "llama_cpp.server" in cmd else [])
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            health = f"http://127.0.0.1:{port}" + ("/health" if "engram_llama.cli" in cmd else "/v1/models")
            wait_up(health, proc)
            r = load(f"http://127.0.0.1:{port}/v1/chat/completions", bodies, args.clients, args.requests)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        results.append(r)
        print(f"| {name} | {r['n']} | {r['errors']} | {r['p50']:.2f} s | {r['p95']:.2f} s | {r['rps']:.3f} req/s |",
              flush=True)
    print(f"\nthroughput, engram-llama / llama-cpp-python: {results[0]['rps'] / results[1]['rps']:.3f}")


if __name__ == "__main__":
    main()
