"""EngramLlama: a question over chunks in, a grounded answer out, attention steered to the chunk
that holds it. A facade over one concern per module, data flowing one way:

    retrieval (rank, rerank, fit) -> plan (resolve) -> hook (bias) + cache (prefill, move) -> generate
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

from . import align, plan as plan_mod, profile as profile_mod, relevance
from ._hook import Hook
from .adapter import LlamaAdapter
from .align import Prompt
from .cache import CacheManager
from .chunks import Chunk
from .extract import Extractor
from .generate import AfterThinking, generate, split_thinking, stops
from .plan import CACHE_RAM_MIB, Plan, Settings
from .pointer_map import PointerMap
from .retrieval import ContextTooSmall, Retriever

__all__ = ["Answer", "Citation", "ContextTooSmall", "EngramLlama", "Settings", "Plan"]


@dataclass
class Citation:
    chunk: Chunk
    score: float
    position: int  # 1-based place in the prompt


@dataclass
class Answer:
    text: str
    citations: list[Citation]
    plan: Plan
    n_prompt_tokens: int
    dropped: list[Chunk] = field(default_factory=list)
    scored: list[relevance.Scored] = field(default_factory=list)
    chunk_order: list[int] = field(default_factory=list)  # chunk ids in prompt order
    thinking: str | None = None  # a thinking model's <think> part (think=True), left out of text
    reused: tuple[str, int] = ("none", 0)  # how the cache served the prompt, and the tokens it reused
    checkpoint_bytes: int = 0              # the document checkpoints held after this answer
    finish_reason: str | None = None       # "stop" (a stop string or the end of the turn) or "length"
    profile: dict = field(default_factory=dict)  # the policy in force: calibrated or not (profile.describe)

    # the plan's parts, as --explain and --json name them
    layers = property(lambda self: self.plan.layers)
    spans = property(lambda self: self.plan.spans)
    strength = property(lambda self: self.plan.strength)
    near = property(lambda self: self.plan.near)
    mid = property(lambda self: self.plan.mid)
    gate = property(lambda self: self.plan.gate)
    order = property(lambda self: self.plan.order)
    moved = property(lambda self: self.plan.moved)
    reread = property(lambda self: self.plan.reread)


@dataclass
class Prepared:
    prompt: Prompt
    pm: PointerMap
    scored: list[relevance.Scored]
    dropped: list[Chunk]

    def __iter__(self):  # prompt, pm, scored, dropped = eng.prepare(...)
        return iter((self.prompt, self.pm, self.scored, self.dropped))


class EngramLlama:
    """model_path: a GGUF file; settings: the steering (plan.Settings; each ask may override it);
    chat=False: a plain prompt ending in an answer prefix (base models such as Gemma-3-270M);
    cache_mib: the cap on the documents' checkpoints kept for questions on earlier document sets;
    think: a chat template with a thinking switch (Qwen3, Qwen3.5) renders with thinking on (default
    off); the reasoning goes to Answer.thinking, not into the answer's text;
    cb_eval: a ggml eval callback on the context (research probes read attention through it);
    flash_attn: llama.cpp's flash attention kernels (off by default, as llama-cpp-python has it);
    profile: "auto" finds the model's calibrated profile (profile.find), a path reads that one
    (profile.ProfileError if it is not this model's), a profile.Profile is used as given, None
    keeps the hand-tuned family defaults (uncalibrated)."""

    def __init__(self, model_path: str, n_ctx: int = 4096, n_threads: int | None = None,
                 n_gpu_layers: int = 0, seed: int = 0, settings: Settings | None = None,
                 extractor: Extractor | None = None, table=None, chat: bool = True, verbose: bool = False,
                 answer_prefix: str | None = None, cache_mib: int = CACHE_RAM_MIB, think: bool = False,
                 cb_eval=None, flash_attn: bool = False, llm=None, hook=None, profile="auto"):
        # llm, hook: one sequence of a context shared with others (sequences.SharedContext), and its hook
        if profile == "auto":
            profile = profile_mod.find(model_path, warn=lambda m: print(f"engram-llama: note: {m}", file=sys.stderr))
        elif profile is not None and not isinstance(profile, profile_mod.Profile):
            from .gguf_check import identity

            profile = profile_mod.read(profile, identity(model_path))
        self.profile = profile
        self.policy = profile.policy if profile is not None else None
        self.llm = llm or LlamaAdapter(model_path, n_ctx, n_threads, n_gpu_layers, seed, verbose, cb_eval, flash_attn)
        self.hook = hook or Hook(self.llm)
        self.seq = getattr(self.llm, "seq", 0)
        self.cache = CacheManager(self.llm, self.hook, cache_mib << 20)
        self.retriever = Retriever(self.llm, extractor, table)
        self.settings = settings or Settings()
        self.template = self.llm.metadata.get("tokenizer.chat_template") if chat else None
        self.answer_prefix = answer_prefix  # None: align.render's default for the prompt's kind
        self.think = bool(think) and align.takes_thinking(self.template)  # a template without the switch: off
        self.n_ctx = self.llm.n_ctx

    def can_move(self) -> bool:
        """Every layer keeps the whole context (dense) and llama.cpp can shift this cache."""
        return plan_mod.is_dense(self.hook.kinds) and self.llm.can_shift()

    def settings_for(self, settings: Settings | None = None) -> Settings:
        """The settings in force: the call's or the runtime's, completed by the calibrated policy."""
        return plan_mod.with_policy(settings or self.settings, self.policy)

    def prepare(self, question: str, chunks: list[Chunk], max_tokens: int = 64, answer_prefix: str | None = None,
                settings: Settings | None = None, history: list[dict] | None = None) -> Prepared:
        """Rank the chunks, fit the best that fit the context, render and align the prompt
        (history: earlier chat turns, before the documents)."""
        if max_tokens < 1:  # llama-cpp-python would read it as "until the context is full"
            raise ValueError(f"invalid max_tokens {max_tokens}: at least 1")
        s = self.settings_for(settings)
        prefix = self.answer_prefix if answer_prefix is None else answer_prefix
        pm, scored = self.retriever.rank(question, chunks, s.rerank)
        prompt, keep, dropped = self.retriever.fit(question, chunks, scored, s.order == "edges", self.template,
                                                   prefix, self.n_ctx - max_tokens, self.think, s.repeat, history)
        kept = set(keep)
        return Prepared(prompt, pm, [sc for sc in scored if sc.chunk.id in kept], dropped)

    def plan(self, prepared: Prepared, question: str, settings: Settings | None = None) -> Plan:
        return plan_mod.resolve(self.settings_for(settings), self.hook.kinds, self.llm.can_shift(),
                                prepared.prompt, prepared.scored, prepared.pm, question)

    def ask(self, question: str, chunks: list[Chunk], max_tokens: int = 64, temperature: float = 0.0,
            on_token: Callable[[str], None] | None = None, answer_prefix: str | None = None,
            settings: Settings | None = None, history: list[dict] | None = None) -> Answer:
        """Answer the question from the chunks. settings: this call's steering (else the runtime's);
        history: earlier chat turns ({"role", "content"}), rendered before the documents."""
        prep = self.prepare(question, chunks, max_tokens, answer_prefix, settings, history)
        p = self.plan(prep, question, settings)
        return self.answer(prep, p, max_tokens, temperature, on_token)

    def answer(self, prep: Prepared, p: Plan, max_tokens: int = 64, temperature: float = 0.0,
               on_token: Callable[[str], None] | None = None) -> Answer:
        """Carry out a plan on a prepared prompt."""
        prompt = prep.prompt
        if p.steered:
            self.hook.set_layers(p.layers, 1.0)
            self.hook.set_bias(p.bias, seq_id=self.seq, gate=p.gate)
        else:
            self.hook.clear(self.seq)
        stop = stops(self.llm, bool(self.template), self.think)
        if self.think:
            on_token = AfterThinking(on_token)
        ends = None
        if p.steered and p.answer_bias is not None:
            def ends(k: int, n=p.answer_bias) -> None:  # the answer's first n tokens decoded: unbiased on
                if k == n:
                    self.hook.clear(self.seq)
        try:
            if p.moved:
                with self.cache.moved(prompt.tokens, prompt.question_token, *p.moved, reread=p.reread) as tokens:
                    text = "".join(generate(self.llm, tokens, max_tokens, temperature, stop, on_token, ends))
            else:
                self.cache.prefill(prompt.tokens, docs=prompt.question_token)
                text = "".join(generate(self.llm, prompt.tokens, max_tokens, temperature, stop, on_token, ends))
        finally:
            self.hook.clear(self.seq)
        thinking = None
        if self.think:  # blank lines were allowed while it thought; the answer ends at one, as unthinking
            thinking, text = split_thinking(text)
            text = text.split("\n\n")[0]
        pos: dict[int, int] = {}
        for k, cid in enumerate(prompt.chunk_order):  # a repeated chunk is cited where it first stands
            pos.setdefault(cid, k + 1)
        cites = [Citation(sc.chunk, w, pos[sc.chunk.id]) for sc, w in p.selected]
        return Answer(text.strip(), cites, p, len(prompt.tokens), prep.dropped, prep.scored, list(prompt.chunk_order),
                      thinking, self.cache.last, self.cache.checkpoint_bytes, self.llm.finish_reason,
                      profile_mod.describe(self.profile))

    def close(self) -> None:
        self.retriever.close()
        self.llm.close()


def trained_context(model_path: str) -> int:
    """The model's trained context (a vocabulary-only load: no weights read)."""
    from . import llama_cpp
    from .lowlevel import Model

    m = Model(model_path, vocab_only=True)
    try:
        return int(llama_cpp.llama_model_n_ctx_train(m.ptr))
    finally:
        m.close()


def context_size(model_path: str, question: str, chunks: list[Chunk], max_tokens: int, cap: int,
                 chat: bool = True, answer_prefix: str | None = None, think: bool = False) -> tuple[int, int, int]:
    """The context the documents need: (n_ctx, the prompt's tokens, the model's trained context).
    The whole prompt and the answer, rounded up to 256, at most the trained context and `cap`;
    the prompt is rendered and tokenized by a vocabulary-only load (no weights read)."""
    from . import align
    from .lowlevel import Model, meta_str, token_piece, tokenize_plain

    m = Model(model_path, vocab_only=True)
    try:
        from . import llama_cpp

        n_train = llama_cpp.llama_model_n_ctx_train(m.ptr)
        template = meta_str(m.ptr, "tokenizer.chat_template") if chat else None
        bos_id, eos_id = llama_cpp.llama_vocab_bos(m.vocab), llama_cpp.llama_vocab_eos(m.vocab)
        bos = token_piece(m.vocab, bos_id).decode("utf-8", "ignore") if bos_id >= 0 else ""
        eos = token_piece(m.vocab, eos_id).decode("utf-8", "ignore") if eos_id >= 0 else ""
        # -i sizes the context before any question: a placeholder (an empty one would end the message in a space)
        question = question.strip() or "?"
        order = [c.id for c in chunks]
        text, _, q_char = align.render(chunks, order, question, template, bos, eos, answer_prefix, think)
        span = align.user_span(chunks, order, q_char, question)
        n = len(tokenize_plain(m.vocab, text, True, [span], m.controls()))
    finally:
        m.close()
    need = n + max_tokens + 64  # a follow-up question a little longer than this one
    limit = min(n_train, cap) if n_train > 0 else cap
    return min(limit, max(512, -(-need // 256) * 256)), n, n_train

