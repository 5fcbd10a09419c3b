"""EngramLlama: a question over chunks in, a grounded answer out, attention steered to the
chunks that hold it. Data flows one way: text -> entities -> pointer map -> relevance -> bias ->
decode.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np

from . import align, bias as bias_mod, move, pointer_map, relevance
from ._hook import Hook, LayerKind
from .chunks import Chunk
from .extract import Extractor
from .lowlevel import quiet_logs, token_piece
from .probe import AttentionProbe, installed, strengths


@dataclass
class Settings:
    layers: list[int] | None = None   # None: the default of the model's family (default_layers)
    strength: float | None = None     # None: by prompt length (auto_strength)
    top_k: int | None = None          # None: TOP_K in the given order, EDGES_TOP_K when reordered
    near: float | None = None         # strength next to the question (bias.chunk_strength); None: NEAR
    mid: float | None = None          # strength a quarter to half the prompt before the question, falling to
                                      # `strength` at its start (bias.chunk_strength); None: by length
                                      # (MID) on dense models unless `strength` is set, 0: none
    granularity: str = "novel"        # "novel" (the chunk less its echoes of the question: a KV key,
                                      # a restated phrase; docs/EVAL.md "Novel spans"), "chunk",
                                      # "sentence" or "entity" (bias.build)
    gate: bool = True                 # bias only the question's and the answer's queries
    order: str = "auto"               # "keep" the given order, put the best chunks at the "edges", or
                                      # "move" the best chunk to the end of the cached documents
                                      # (positions shifted, no prefill; dense models); "auto": ORDER_AUTO
                                      # from MOVE_FROM prompt tokens where a move is possible, else keep
    reread: str = "never"             # with order "move": when the moved chunk is read again at the
                                      # documents' end (its tokens decoded there) instead of its cells
                                      # shifted: "never", "first" (the documents' first chunk only) or
                                      # "always" (move.rereads; docs/EVAL.md "The moved chunk read again")
    engram: bool = True               # False: vanilla, the same prompt without bias
    rerank: int | None = None         # chunks reread for the question's likelihood; None: RERANK_K, 0: off
    # the top chunk's share of the question's attention to reach (probe.py), read before biasing;
    # replaces strength and near (an option, not the default: docs/EVAL.md, "A strength set from
    # the attention the chunk already gets")
    target: float | None = None

    def __post_init__(self):
        move.check_reread(self.reread)  # before a move fails on it, and the documents are read


@dataclass
class Citation:
    chunk: Chunk
    score: float
    position: int  # 1-based place in the prompt


@dataclass
class Answer:
    text: str
    citations: list[Citation]
    spans: list[bias_mod.BiasSpan]
    layers: list[int]
    strength: float
    gate: int | None
    n_prompt_tokens: int
    dropped: list[Chunk] = field(default_factory=list)
    scored: list[relevance.Scored] = field(default_factory=list)
    order: str = "keep"
    near: float | None = None   # the profile around `strength` (bias.chunk_strength; each span has
    mid: float | None = None    # its chunk's value); None where nothing was biased
    moved: tuple[int, int] | None = None  # order "move": the tokens shifted to the documents' end
    reread: bool = False        # order "move": those tokens read again there, not their cells shifted


class ContextTooSmall(Exception):
    pass


def auto_strength(n_tokens: int) -> float:
    """Default bias strength for a prompt of n_tokens.

    A passage's share of attention falls as the keys it competes with grow, so the bias has to
    grow with the context. Measured on SmolLM2 (docs/EVAL.md): +2 is best at ~2K tokens (+3/+4
    lose the last slot), +4 at ~4K (the middle slot 17% -> 67%, +2 gives 8%). In between it is
    interpolated in log2 of the length; outside, it stays at the nearest measured value.
    """
    return by_length(n_tokens, 2048, 4096, 2.0, 4.0)


def by_length(n_tokens: int, lo: float, hi: float, at_lo: float, at_hi: float) -> float:
    """at_lo up to lo tokens, at_hi from hi, linear in log2 of the length between."""
    t = np.log2(max(n_tokens, 1) / lo) / np.log2(hi / lo)
    return float(at_lo + (at_hi - at_lo) * np.clip(t, 0.0, 1.0))


MID_FROM, MID_FULL = 1536, 3072


def mid_strength(n_tokens: int, lo: float = MID_FROM, hi: float = MID_FULL) -> float:
    """The middle's strength by default on dense models (MID): +2 up to `lo` prompt tokens, +5
    from `hi`, log2-interpolated between. +5 in the middle lifted KV (~3.5K) and NQ ~4K/~8K; on
    the embedded sample (~1.5K tokens) SmolLM2 recites a document's heading at +2.35 and answers
    at +2 (docs/EVAL.md, "The middle's strength by length")."""
    return by_length(n_tokens, lo, hi, 2.0, 5.0)


# the best chunk alone: against the top 3 (weights s_i / s_max) it gained 16 answers and lost 5 over
# NQ ~2K (SmolLM2), NQ ~4K (Gemma-3-270M) and the domain set (SmolLM2, ~4.6K), where near-duplicate
# distractors took the top-3 bias (docs/EVAL.md, "Top-1 or top-3")
TOP_K = 1
# in the given order, the strength for a chunk next to the question (rising to the length's strength
# a quarter of the prompt away): small models already read that chunk, and +4 there makes them copy
# it instead of answering (domain set, gold last, top-1: SmolLM2 42% -> 75%, Gemma-3-270M 67% -> 75%;
# docs/EVAL.md, "The domain set"); at ~2K on NQ too, +3/+4 lost the last slot where +2 held it
NEAR = 2.0
# models with sliding-window or recurrent layers (the flat ramp): +3 next to the question. On
# Gemma-3-270M with novel spans (the key a KV record shares with the question left unbiased, which
# the model had copied back under more strength) the last slot gained +18/-8 against +2 over nine
# sets: NQ ~2K/~4K/~8K, the domain set at ~3.9K/~6.5K, KV at 48 and 75 records in both answer
# formats (KV at 75 records with the key restated 58% -> 92%, the target met there; the domain set
# at ~6.5K lost 42% -> 25%, still above vanilla's 17%); +4 took the domain set's last slot below
# vanilla's (docs/EVAL.md, "The strength next to the question on Gemma-3-270M")
NEAR_WINDOWED = 3.0
# in the given order on dense models, the strength from a quarter to half the prompt before the
# question, falling back to the length's strength at the first token: by length (mid_strength). On
# SmolLM2 (dense) it gained +14/-4 against the flat ramp over KV, NQ ~1K/~2K/~4K/~8K and the domain
# set (KV's middle 17% -> 83%, NQ ~8K's 50% -> 75%); on Gemma-3-270M (three global layers biased,
# the nearest analogue of the hybrids) +9/-14 over NQ ~2K/~4K/~8K and the domain set, so models with
# sliding-window or recurrent layers keep the flat ramp (docs/EVAL.md, "The middle's strength by
# length")
MID = mid_strength
EDGES_STRENGTH, EDGES_TOP_K = 1.0, 1
# the strength on a moved chunk (order "move"): +2, against +1 on SmolLM2 at 6-8K tokens: the domain
# set at ~7.6K +10/-2 (n = 12; at the last slot, where +1 is weaker than the given order's +2 next
# to the question, 25% -> 67%), KV at ~6.2K +3/-0 (n = 6), NQ at ~8K +5/-6 (n = 24); against the
# given order +27/-11 over the three, where +1 was +25/-19 (docs/EVAL.md, "Moving the best chunk by
# default?")
MOVE_STRENGTH = 2.0
# the order "auto": from MOVE_FROM prompt tokens the best chunk is moved to the documents' end in the
# cache (MOVE_STRENGTH on it), where the model can take a move (EngramLlama.can_move: dense, its
# cache can shift positions) and the settings allow one (the gate, whole chunks, no target share, a
# bias at all); below that and elsewhere the given order with its profile. On SmolLM2 at 6.2-8K
# tokens (+2): NQ ~8K (n = 24) 71 / 67 / 67% against the given order's 25 / 62 / 71% (+16/-5); KV
# ~6.2K 100 / 100 / 50% against 67 / 33 / 50% (+6/-0); the domain set ~7.6K level (+5/-6). Below: on
# NQ ~4K the move + 2 gained (+12/-4, n = 24) but the domain set at ~4.6K lost 11 answers and gained
# 1 under it (16 to 1 with +1), and KV at ~3.5K was level (docs/EVAL.md, "Moving the best chunk by
# default?"): 6144 lies between the domain set's loss at ~4.6K and the gains from 6.2K
ORDER_AUTO, MOVE_FROM = "move", 6144


def chunk_choice(s: Settings, n_tokens: int, dense: bool = True) -> tuple[float, int, float | None, float | None]:
    """Strength, top-k, near-question strength and middle strength for a prompt of n_tokens.

    In the given order: the length's strength (auto_strength) on the top-1 chunk, NEAR next to the
    question (NEAR_WINDOWED on models with sliding-window or recurrent layers), on a dense model
    MID(n_tokens) in the middle of the prompt (not under a strength of one's own). Reordered (best
    chunk last, next to the question): +1 on that best chunk alone. On NQ at ~4K and ~8K with
    hard distractors that beat reordering alone on SmolLM2 and Gemma-3-270M (n = 40 each, pooled
    +28/-5 over 160 pairs), while the length's strength on the top 3 matched or cost answers at ~4K (docs/EVAL.md, "Against reordering"). Moved: MOVE_STRENGTH on it alone."""
    mid = s.mid or None  # 0: none (order "auto" unresolved reads as the given order)
    if s.order in ("edges", "move"):  # the best chunk next to the question either way
        own = MOVE_STRENGTH if s.order == "move" else EDGES_STRENGTH
        return (s.strength if s.strength is not None else own,
                s.top_k if s.top_k is not None else EDGES_TOP_K, s.near, mid)
    if s.mid is None and s.strength is None and dense:  # a strength of one's own stays flat unless mid is given
        mid = MID(n_tokens)
    return (s.strength if s.strength is not None else auto_strength(n_tokens),
            s.top_k if s.top_k is not None else TOP_K,
            s.near if s.near is not None else NEAR if dense else NEAR_WINDOWED, mid)


def default_layers(kinds: list[LayerKind]) -> list[int]:
    """Layers biased by default, by model family.

    Hybrids (Qwen3.5: softmax every 4th layer) get every softmax layer; sliding-window models
    (Gemma 3) their global layers, the only ones that reach far; dense models the second half of
    their layers (prototype on SmolLM2: 15-29 of 30; all layers hurt the last slot).
    """
    soft = [il for il, k in enumerate(kinds) if k in (LayerKind.FULL, LayerKind.SWA)]
    if any(k == LayerKind.NONE for k in kinds):
        return soft
    if any(k == LayerKind.SWA for k in kinds):
        return [il for il, k in enumerate(kinds) if k == LayerKind.FULL]
    return soft[len(soft) // 2:]


def is_dense(kinds: list[LayerKind]) -> bool:
    """Every layer full softmax attention (Llama-style), no sliding-window or recurrent layers."""
    return bool(kinds) and all(k == LayerKind.FULL for k in kinds)


class EngramLlama:
    def __init__(self, model_path: str, n_ctx: int = 4096, n_threads: int | None = None,
                 n_gpu_layers: int = 0, seed: int = 0, settings: Settings | None = None,
                 extractor: Extractor | None = None, table=None, chat: bool = True, verbose: bool = False,
                 probe: bool = False, answer_prefix: str | None = None):
        from . import llama_cpp

        quiet_logs()
        # probe: read the attention each chunk gets before biasing (probe.py); the callback lives
        # as long as the context
        probe = probe or (settings is not None and settings.target is not None)
        self.probe = AttentionProbe() if probe else None
        with installed(self.probe) if probe else contextlib.nullcontext():
            self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(),
                                       n_gpu_layers=n_gpu_layers, seed=seed, verbose=verbose)
        self.hook = Hook(self.llm)
        self._unbiased = 0  # how many cached tokens were decoded with no bias on their queries (prefill)
        self.settings = settings or Settings()
        self.table = table
        self.extract = extractor or Extractor(table=table)  # warns once when spaCy's model is missing
        # chat=False: a plain prompt ending in an answer prefix (base models such as Gemma-3-270M)
        self.template = self.llm.metadata.get("tokenizer.chat_template") if chat else None
        self.answer_prefix = answer_prefix  # None: align.render's default for the prompt's kind
        vocab = self.llm._model
        self._bos_id = self.llm.token_bos()
        self._eos_id = self.llm.token_eos()
        self._bos = vocab.token_get_text(self._bos_id) if self._bos_id >= 0 else ""
        self._eos = vocab.token_get_text(self._eos_id) if self._eos_id >= 0 else ""
        # llama.cpp may round the context up; llama-cpp-python sizes its buffers by the request
        self.n_ctx = min(self.llm.n_ctx(), n_ctx)
        self._n_threads = n_threads or os.cpu_count()
        self._likelihood = None  # made on first use: a small second context on the same weights
        self._lm_cache: dict[tuple[str, str, str], float] = {}

    # prompt ---------------------------------------------------------------------------------

    def _tokenize(self, text: str) -> tuple[list[int], list[bytes], int]:
        add_bos = self._bos_id >= 0 and self.llm._model.add_bos_token() and not (self._bos and text.startswith(self._bos))
        toks = self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        n_prefix = 1 if add_bos and toks and toks[0] == self._bos_id else 0
        vocab = self.llm._model.vocab
        pieces = [token_piece(vocab, t) for t in toks]
        return toks, pieces, n_prefix

    def prepare(self, question: str, chunks: list[Chunk], max_tokens: int = 64, answer_prefix: str | None = None):
        """Score the chunks, fit the best that fit the context, render and align the prompt
        (answer_prefix: align.render's, else the one the runtime was made with)."""
        prefix = self.answer_prefix if answer_prefix is None else answer_prefix
        s = self.settings
        ents = self.extract([question] + [c.text for c in chunks])
        pm = pointer_map.build(ents[0], chunks, ents[1:], self.table)
        scored = self.rerank(question, relevance.score(question, chunks, pm))
        rank = {sc.chunk.id: k for k, sc in enumerate(scored)}
        keep = [c.id for c in chunks]
        dropped: list[Chunk] = []
        while True:
            order = relevance.edges_order(sorted(keep, key=rank.get)) if s.order == "edges" else keep
            text, spans, q_char = align.render(chunks, order, question, self.template, self._bos, self._eos, prefix)
            toks, pieces, n_prefix = self._tokenize(text)
            if len(toks) + max_tokens <= self.n_ctx:
                break
            if not keep:
                raise ContextTooSmall(f"the context ({self.n_ctx} tokens) is too small for the question alone "
                                      f"({len(toks)} tokens + {max_tokens} to answer); raise -c")
            worst = max(keep, key=rank.get)
            keep.remove(worst)
            dropped.append(next(c for c in chunks if c.id == worst))
        prompt = align.align(text, toks, pieces, n_prefix, spans, q_char, order)
        kept_ids = set(keep)
        kept = [sc for sc in scored if sc.chunk.id in kept_ids]
        return prompt, pm, kept, dropped

    def rerank(self, question: str, scored: list[relevance.Scored]) -> list[relevance.Scored]:
        """The best chunks reordered by score and the question's likelihood after each."""
        k = self.settings.rerank if self.settings.rerank is not None else relevance.RERANK_K
        head = [sc.chunk for sc in scored[:k]]
        if len(head) < 2:
            return scored
        if self._likelihood is None:
            from .likelihood import QueryLikelihood

            self._likelihood = QueryLikelihood(self.llm.model, n_seq=k, n_threads=self._n_threads)
        # a score depends on the question and the chunk's text only: the same chunks in another
        # order (reordering, another slot) are not reread
        keys = [(question, c.source, c.text) for c in head]
        todo = [c for c, key in zip(head, keys) if key not in self._lm_cache]
        if todo:
            if len(self._lm_cache) > 4096:
                self._lm_cache.clear()
            for c, v in zip(todo, self._likelihood(question, todo)):
                self._lm_cache[(question, c.source, c.text)] = float(v)
        return relevance.rerank(scored, np.array([self._lm_cache[key] for key in keys]))

    # answering -------------------------------------------------------------------------------

    def layers(self) -> list[int]:
        return self.settings.layers if self.settings.layers is not None else default_layers(self.hook.kinds)

    def ask(self, question: str, chunks: list[Chunk], max_tokens: int = 64, temperature: float = 0.0,
            on_token: Callable[[str], None] | None = None, answer_prefix: str | None = None) -> Answer:
        prompt, pm, scored, dropped = self.prepare(question, chunks, max_tokens, answer_prefix)
        s = replace(self.settings, order=self.order(len(prompt.tokens)))
        strength, top_k, near, mid = chunk_choice(s, len(prompt.tokens), is_dense(self.hook.kinds))
        selected = relevance.select(scored, top_k)
        layers = self.layers()
        moved = self._moved_span(prompt, selected) if s.order == "move" else None
        again = bool(moved) and move.rereads(s.reread, prompt, selected[0][0].chunk.id)
        if s.engram and selected and s.target is not None:
            selected = selected[:1]
            strength, near, mid = self._strength_for_share(prompt, selected[0][0].chunk.id, layers, s.target), None, None
        # spans and bias where the cache holds the chunks: the moved chunk at the documents' end
        at = move.moved_prompt(prompt, *moved) if moved else prompt
        b, spans = bias_mod.build(at, selected, strength, s.granularity, pm, question, near=near, mid=mid)
        gate = prompt.question_token if s.gate else 0
        if s.engram and selected:
            self.hook.set_layers(layers, 1.0)
            self.hook.set_bias(b, seq_id=0, gate=gate)
        else:
            self.hook.clear()
        saved = None
        try:
            tokens = prompt.tokens
            if moved:
                tokens, saved = self._move(prompt, *moved, reread=again)
            else:
                self.prefill(prompt.tokens)
            text = "".join(self._generate(tokens, max_tokens, temperature, on_token))
        finally:
            self.hook.clear()
            if saved is not None:
                self._unmove(prompt, saved)
        pos = {cid: k + 1 for k, cid in enumerate(prompt.chunk_order)}
        cites = [Citation(sc.chunk, w, pos[sc.chunk.id]) for sc, w in selected]
        steered = bool(s.engram and selected)
        return Answer(text.strip(), cites, spans if steered else [], layers if steered else [], strength,
                      gate if steered else None, len(prompt.tokens), dropped, scored, s.order,
                      near if steered else None, mid if steered else None, moved, again)

    def order(self, n_tokens: int) -> str:
        """The settings' order for a prompt of n_tokens, "auto" resolved: ORDER_AUTO from MOVE_FROM
        tokens where this model and these settings can take it, else the given order (vanilla keeps
        the given order: the same prompt, no bias)."""
        s = self.settings
        if s.order != "auto":
            return s.order
        if n_tokens < MOVE_FROM or not s.engram or self._why_not_move():
            return "keep"
        return ORDER_AUTO

    def can_move(self) -> bool:
        """Every layer keeps the whole context (dense) and llama.cpp can shift this cache's
        positions (not for models with multi-dimensional positions)."""
        from . import llama_cpp

        return is_dense(self.hook.kinds) and bool(llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(self.llm.ctx)))

    def _why_not_move(self) -> str | None:
        """Why this model or these settings cannot take a move (None: they can)."""
        s = self.settings
        if not self.can_move():
            # a sliding-window cache no longer holds a far chunk for its local layers, and a
            # recurrent state has read the chunks in their order: shifting positions misleads both
            return ("order 'move' needs a model whose every layer keeps the whole context "
                    "(dense, Llama-style); use 'edges' or 'keep' with this one")
        if not s.gate:
            return "order 'move' needs the query gate: the documents are read before the move"
        if s.target is not None:
            return "order 'move' cannot take a target share: the probe reads the chunk before the move"
        if s.granularity not in ("chunk", "novel"):
            return "order 'move' biases the moved chunk by its tokens: granularity must be 'chunk' or 'novel'"
        return None

    def _moved_span(self, prompt, selected) -> tuple[int, int] | None:
        if not selected:
            return None
        why = self._why_not_move()
        if why:
            raise ValueError(why)
        a, b = move.moved_span(prompt, selected[0][0].chunk.id)
        # already last: nothing to move (a shift there and back would only re-round the keys)
        return (a, b) if b < prompt.question_token else None

    def _move(self, prompt, a: int, b: int, reread: bool = False):
        """The documents prefilled in the given order (reused when cached), a copy of their cells,
        then [a, b) shifted to their end (reread: its tokens decoded there again instead).
        llama-cpp-python's bookkeeping is told the moved order, so that its prefix match decodes
        only the question."""
        from . import llama_cpp

        q0 = prompt.question_token
        self.prefill(prompt.tokens[:q0 + 1])
        ctx = self.llm.ctx
        saved = move.save_seq(llama_cpp, ctx)
        try:
            mem = llama_cpp.llama_get_memory(ctx)
            if reread:
                # through llama-cpp-python's bookkeeping: eval reads the chunk from n_tokens on; the
                # gate keeps its queries unbiased, as a document's
                def decode(ids, pos0):
                    self.llm.n_tokens = pos0
                    self.llm.eval(ids)
                move.reread_to_end(llama_cpp, mem, decode, prompt.tokens, a, b, q0)
            else:
                move.shift_to_end(llama_cpp, mem, a, b, q0)
            tokens = move.moved_tokens(prompt.tokens, a, b, q0)
            self.llm.input_ids[:q0] = tokens[:q0]
            self.llm.n_tokens = q0
        except BaseException:  # never leave the documents moved under the given order's bookkeeping
            self._unmove(prompt, saved)
            raise
        return tokens, saved

    def _unmove(self, prompt, saved) -> None:
        """The documents' cells in the given order again, for the next question to reuse."""
        from . import llama_cpp

        q0 = prompt.question_token
        try:
            move.restore_seq(llama_cpp, self.llm.ctx, saved)
        except RuntimeError:  # the next question prefills again
            self.llm.reset()
            self.llm._ctx.kv_cache_clear()
            return
        self.llm.input_ids[:q0] = prompt.tokens[:q0]
        self.llm.n_tokens = q0

    def _strength_for_share(self, prompt, chunk_id: int, layers: list[int], target: float) -> float:
        """One strength for all biased layers: the one that takes the chunk's share of the
        question's attention, averaged over those layers, to the target. Per-layer strengths put
        least on the layers that already read the chunk and lost KV retrieval's first slot."""
        from . import llama_cpp

        if self.probe is None:
            raise ValueError("a target share needs EngramLlama(..., probe=True)")
        if not self.settings.gate:
            raise ValueError("a target share reads the documents without bias: it needs the query gate")
        q0 = prompt.question_token
        self.hook.clear()
        self.prefill(prompt.tokens[:q0 + 1])  # the documents (reused when cached)
        # recurrent state cannot be cut back to a position: keep the documents' state instead
        recurrent = any(k == LayerKind.NONE for k in self.hook.kinds)
        saved = None
        if recurrent:
            n = llama_cpp.llama_state_seq_get_size(self.llm.ctx, 0)
            saved = (ctypes.c_uint8 * n)()
            if llama_cpp.llama_state_seq_get_data(self.llm.ctx, saved, n, 0) != n:
                raise RuntimeError("could not keep the documents' state for the attention probe")
        with self.probe.reading(layers):
            self.llm.eval(prompt.tokens[q0:])
        if saved is not None:
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llm.ctx), 0, -1, -1)
            ok = llama_cpp.llama_state_seq_set_data(self.llm.ctx, saved, len(saved), 0) == len(saved)
        else:
            ok = self.llm._ctx.kv_cache_seq_rm(-1, q0, -1)
        if not ok:
            self.llm.reset()
            self.llm._ctx.kv_cache_clear()
        else:
            self.llm.n_tokens = q0
        return strengths(self.probe.share(prompt.chunk_tokens[chunk_id]), layers, target)[layers[0]]

    def prefill(self, tokens: list[int], progress: bool | None = None) -> int:
        """Decode all but the last prompt token, reusing the cached prefix (the documents, when a
        follow-up question comes on the same chunks); returns how many tokens were reused.

        With the query gate the documents' KV does not depend on the bias, so reusing it across
        questions and bias settings is exact; the question's does, so nothing from the gate on
        (of the cached decode or of this one) is reused: a question asked again, or prefilled
        before its bias was set, is decoded again under the bias it gets now. Recurrent and
        hybrid memories cannot be cut back to a prefix, so they prefill again.
        """
        llm = self.llm
        n_old = llm.n_tokens
        gate = self.hook.gate(0)
        p = 0
        for a, b in zip(llm.input_ids[:min(n_old, self._unbiased)], tokens[:-1][:gate]):
            if a != b:
                break
            p += 1
        self._unbiased = sys.maxsize if gate is None else gate  # the cache from here on: decoded under the bias
        if p == 0 or not llm._ctx.kv_cache_seq_rm(-1, p, -1):
            llm.reset()
            llm._ctx.kv_cache_clear()
            p = 0
        llm.n_tokens = p
        rest = tokens[p:-1]
        if progress is None:
            progress = sys.stderr.isatty() and len(rest) >= 1024
        from tqdm import tqdm

        with tqdm(total=len(rest), desc="prefill", unit="tok", disable=not progress, file=sys.stderr, leave=False) as bar:
            step = llm.n_batch
            for a in range(0, len(rest), step):
                llm.eval(rest[a:a + step])
                bar.update(len(rest[a:a + step]))
        return p

    def _generate(self, tokens: list[int], max_tokens: int, temperature: float,
                  on_token: Callable[[str], None] | None) -> Iterator[str]:
        stop = ["\n\n"] + ([self._eos] if self._eos else []) + (["<|im_end|>", "<end_of_turn>"] if self.template else ["\n"])
        for part in self.llm.create_completion(prompt=tokens, max_tokens=max_tokens, temperature=temperature,
                                               top_k=1 if temperature == 0 else 40, stream=True, stop=stop):
            piece = part["choices"][0]["text"]
            if on_token:
                on_token(piece)
            yield piece

    def close(self) -> None:
        if self._likelihood is not None:
            self._likelihood.close()
            self._likelihood = None
        self.llm.close()
