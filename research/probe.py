"""The share of the question's attention each chunk already gets, read before biasing.

A fixed logit offset moves a chunk's share of attention by an amount that depends on where it
started: +4 lifts a chunk far from the question that gets 0.4% of it to about 20%, and makes one
next to the question that already gets 5% take three quarters of it, which is when small models
recite the chunk instead of answering. Reading the unbiased share m0 first lets the strength be
set for a target share T instead: a query whose share is m0 gets m0 e^b / (m0 e^b + 1 - m0) after
a bias b on the chunk, so b = log(T (1 - m0) / (m0 (1 - T))).

The share is read through llama.cpp's eval callback, from the softmax of the biased layers
("kq_soft_max-<layer>", present with flash attention off) while the question's tokens are decoded
once without bias; the caller removes those tokens from the cache before decoding them again.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable

import numpy as np

from engram_llama import llama_cpp
from engram_llama.lowlevel import GGML_TYPE_F32, _TensorHead, ggml_base

# the most a target can ask for: beyond it a chunk with almost no attention would be pushed to
# take all of it, which the fixed strengths never did (+6 was the most tried)
MAX_STRENGTH = 8.0


class AttentionProbe:
    """An eval callback that keeps the softmax of the chosen layers while armed."""

    def __init__(self):
        self.layers: set[int] = set()
        self.armed = False
        self.rows: dict[int, list[np.ndarray]] = {}
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)

    def _layer(self, name: str) -> int | None:
        if not name.startswith("kq_soft_max-"):
            return None
        il = int(name.rsplit("-", 1)[1])
        return il if il in self.layers else None

    def _on_eval(self, t, ask, _user_data):
        ggml = ggml_base()
        il = self._layer(ggml.ggml_get_name(t).decode()) if self.armed else None
        if ask:
            return il is not None
        head = _TensorHead.from_address(t)
        if il is None or head.type != GGML_TYPE_F32 or not ggml.ggml_is_contiguous(t):
            return True
        shape = tuple(reversed([head.ne[i] for i in range(4)]))  # (1, heads, queries, keys)
        buf = np.empty(shape, dtype=np.float32)
        ggml.ggml_backend_tensor_get(t, buf.ctypes.data, 0, ggml.ggml_nbytes(t))
        self.rows.setdefault(il, []).append(buf)
        return True

    @contextlib.contextmanager
    def reading(self, layers: Iterable[int]):
        """Capture the softmax of these layers for the decodes inside the block."""
        self.layers, self.rows, self.armed = set(layers), {}, True
        try:
            yield self
        finally:
            self.armed = False

    def shares(self, span: tuple[int, int]) -> dict[int, np.ndarray]:
        """Per layer: the attention the key cells [a, b) get, per head (rows) and query (columns,
        in decode order). Key cells are positions when the sequence was decoded from 0 into a
        cleared cache."""
        a, b = span
        return {il: np.concatenate([p[0, :, :, a:b].sum(-1) for p in parts], axis=1)
                for il, parts in self.rows.items()}

    def share(self, span: tuple[int, int], heads: int | None = None) -> dict[int, float]:
        """Per layer: that attention averaged over queries, then over the `heads` heads that give
        the span most (None: all heads). Retrieval is done by a few heads, and the mean over all
        of them hides theirs (one target on the mean did not fit both NQ and KV, docs/EVAL.md)."""
        out = {}
        for il, x in self.shares(span).items():
            per_head = x.mean(axis=1)
            k = len(per_head) if heads is None else min(max(heads, 1), len(per_head))
            out[il] = float(np.sort(per_head)[::-1][:k].mean())
        return out


@contextlib.contextmanager
def installed(probe: AttentionProbe):
    """Contexts made inside the block (llama_cpp.Llama builds its own parameters) report to the probe."""
    from engram_llama.adapter import eval_callback

    with eval_callback(probe.callback):
        yield probe


def strength_for_share(eng, probe: AttentionProbe, prompt, chunk_id: int, layers: list[int], target: float) -> float:
    """The target-share experiment on the product's path: one strength for the biased layers, the
    one that takes the chunk's share of the question's unbiased attention (averaged over the
    layers) to `target`. The question is read after the cached documents and taken out again by
    the cache manager (cache.peek); `eng` must be made with cb_eval=probe.callback. Use the result
    as ask(settings=Settings(strength=s, near=s, mid=0, top_k=1, order="keep"))."""
    eng.hook.clear()
    q0 = prompt.question_token
    eng.cache.prefill(prompt.tokens[:q0 + 1], docs=q0)  # the documents, outside the probe's reading
    with probe.reading(layers):
        eng.cache.peek(prompt.tokens, q0)
    return strengths(probe.share(prompt.chunk_tokens[chunk_id]), layers, target)[layers[0]]


def strength_for(m0: float, target: float, cap: float = MAX_STRENGTH) -> float:
    """The bias that takes a share m0 to the target share (0 where it is already there)."""
    m0 = min(max(m0, 1e-9), 1 - 1e-9)
    return float(min(cap, max(0.0, math.log(target * (1 - m0) / (m0 * (1 - target))))))


def strengths(share: dict[int, float], layers: Iterable[int], target: float, per_layer: bool = False) -> dict[int, float]:
    """The strength per biased layer: one for all from the share averaged over them, or each from
    its own share (per_layer; it put least on the layers that already read the chunk and lost KV
    retrieval's first slot, docs/EVAL.md)."""
    layers = list(layers)
    missing = [il for il in layers if il not in share]
    if missing:  # flash attention fuses the softmax away
        raise RuntimeError(f"the attention probe read no softmax at layers {missing}: it needs flash attention off")
    if per_layer:
        return {il: strength_for(share[il], target) for il in layers}
    return dict.fromkeys(layers, strength_for(float(np.mean([share[il] for il in layers])), target))


def strength_over_rival(m0: float, rival: float, margin: float, cap: float = MAX_STRENGTH) -> float:
    """The bias that gives the chunk e^margin times the share of the other chunk the question reads
    most (rival), clipped to [0, cap]: a target relative to the competition rather than absolute,
    since how much share a task needs differed between NQ and KV retrieval (docs/EVAL.md)."""
    m0, rival = max(m0, 1e-9), max(rival, 1e-9)
    return float(min(cap, max(0.0, math.log(rival / m0) + margin)))
