#!/usr/bin/env python3
"""Print the hook's accuracy figures quoted in docs/HOOK.md (CPU, deterministic).

    .venv/bin/python scripts/hook_figures.py
"""
import sys
from pathlib import Path

import numpy as np

import engram_llama
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from research import synth
from engram_llama.lowlevel import Context, Model

from conftest import smollm2_path  # noqa: E402

N = 48


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def main():
    rng = np.random.default_rng(0)
    print(f"{'model':10} {'layer':>5} {'max|P-ref|':>11} {'max|P-P0|':>10} {'FA-vs-plain logits':>19} {'ubatch 1 vs 512':>16}")
    for name in ("llama", "gemma3", "qwen35"):
        m = Model(synth.cached_model(name))
        ids = rng.integers(0, m.n_vocab, N)
        bias = rng.normal(0, 1.5, N).astype(np.float32)
        with Context(m, n_ctx=256, capture=lambda n: n.startswith(("kq-", "kq_soft_max-"))) as c:
            L = c.hook.softmax_layers()[-1]
            c.decode_seq(ids)
            p0 = c.captured[f"kq_soft_max-{L}"][0]
            c.clear_kv()
            c.hook.set_layer(L, 1.5)
            c.hook.set_bias(bias)
            c.decode_seq(ids)
            kq, p = c.captured[f"kq-{L}"][0], c.captured[f"kq_soft_max-{L}"][0]
            scale = c.op_params[f"kq_soft_max-{L}"][0]
            swa = c.hook.kinds[L].name == "SWA"
        n_kv = kq.shape[-1]
        q, k = np.arange(N)[:, None], np.arange(n_kv)[None, :]
        keep = (k <= q) & (k < N) & (((q - k) < 16) if swa else True)
        b = np.pad(1.5 * bias, (0, n_kv - N))
        ref = softmax(kq * scale + np.where(keep, 0, -np.inf) + b)
        logits = {}
        for fa in (False, True):
            for ub in (512, 1):
                if fa and ub == 1:
                    continue
                with Context(m, n_ctx=256, flash_attn=fa, n_ubatch=ub) as c:
                    c.hook.set_layers(c.hook.softmax_layers(), 2.0)
                    c.hook.set_bias(bias, gate=N // 2)
                    logits[(fa, ub)] = c.decode_seq(ids)
        print(f"{name:10} {L:>5} {np.abs(p - ref).max():>11.2e} {np.abs(p - p0).max():>10.3f} "
              f"{np.abs(logits[(True, 512)] - logits[(False, 512)]).max():>19.2e} "
              f"{np.abs(logits[(False, 1)] - logits[(False, 512)]).max():>16.2e}")
        m.close()

    p = smollm2_path()
    if p is not None:
        import test_smollm2 as t
        m = Model(p)
        ids, spans, q0 = t.build(m)
        gold, other = t.first_digit(m, t.ASK), t.first_digit(m, t.DISTRACTOR)

        def logp(x, tok):
            x = x - x.max()
            return float(x[tok] - np.log(np.exp(x).sum()))

        with Context(m, n_ctx=1024) as c:
            out = {"vanilla": c.decode_seq(ids, all_logits=False)[-1]}
            toward = np.zeros(len(ids), np.float32)
            toward[slice(*spans[t.DISTRACTOR])] = 3.0
            c.hook.set_layers(range(15, 30), 1.0)
            c.hook.set_bias(toward, gate=q0)
            c.clear_kv()
            out["steered to note 6 (+3, layers 15-29)"] = c.decode_seq(ids, all_logits=False)[-1]
            hidden = np.zeros(len(ids), np.float32)
            hidden[slice(*spans[t.ASK])] = -1e9
            c.hook.set_layers(range(30), 1.0)
            c.hook.set_bias(hidden, gate=q0)
            c.clear_kv()
            out["gold note hidden (-1e9, all layers)"] = c.decode_seq(ids, all_logits=False)[-1]
        print(f"\nSmolLM2-135M-Instruct, {len(ids)} tokens, answer in note {t.ASK + 1} of {len(t.FACTS)}")
        for k, v in out.items():
            print(f"  {k:38} p(gold digit) {np.exp(logp(v, gold)):.3f}   p(note 6 digit) {np.exp(logp(v, other)):.3f}")
        m.close()


if __name__ == "__main__":
    main()
