"""Settings in, one resolved plan out: which layers, which chunk, how strong, in which order.

The policy's defaults live in policy.py (the hand-tuned family defaults, and a calibrated
profile's Policy, which `with_policy` turns into Settings); `resolve` is the one place that turns
settings, the model's layer kinds and a prompt into what `ask` does, and the `Plan` it returns is what `--explain` prints and `--json`
writes. The option schema (OPTIONS) gives the CLI its flags and help and docs/PIPELINE.md its
defaults table, so the three cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from . import bias as bias_mod, move, relevance
from .align import Prompt
from .pointer_map import PointerMap

# --- the steering policy (policy.py: the calibrated one and the hand-tuned family defaults) ---

from .policy import (EDGES_STRENGTH, EDGES_TOP_K, MID, MOVE_FROM, MOVE_STRENGTH, NEAR, NEAR_WINDOWED,
                     ORDER_AUTO, TOP_K, Candidate, Policy, auto_strength)

# whole-sequence document checkpoints kept for questions on earlier document sets (MiB; --cache-ram;
# llama-server's own default is 8192, this one is for a laptop)
CACHE_RAM_MIB = 2048
MAX_LAYERS = 4096  # --layers beyond any model: refused before a range is expanded

ORDERS = ("auto", "keep", "edges", "move")
GRANULARITIES = ("novel", "chunk", "sentence", "entity", "focus")


# --- settings and their schema -------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One setting: its CLI flag and help, and whether the user CLI offers it (options that lost
    on the project's measurements stay reachable from the research entry point only)."""
    name: str
    flag: str
    help: str
    user: bool
    type: Any = None
    choices: tuple | None = None
    metavar: str | None = None
    default_doc: str = ""  # the default as the docs table states it


OPTIONS = [
    Option("layers", "--layers", "layers to bias: 15-29, 3,7,11 or all", True, str, metavar="SPEC",
           default_doc="dense: the second half; sliding-window: the global layers; hybrid: every softmax layer"),
    Option("strength", "--strength", "bias strength at the prompt's start (by length otherwise)", True, float,
           default_doc="+2 up to 2K prompt tokens, +4 from 4K (log2 between)"),
    Option("order", "--order", "chunk order: keep yours; edges: best chunk last (then +1 on it); move: the best "
           f"chunk moved to the documents' end in the cache (dense models; then +{MOVE_STRENGTH:g} on it); auto: move from "
           f"{MOVE_FROM} prompt tokens where possible, else keep", True, str, ORDERS,
           default_doc=f"auto (move from {MOVE_FROM} tokens on dense models, else keep)"),
    Option("rerank", "--rerank", "reread the K best chunks and rank them by how likely the model finds the "
           "question after each (0: BM25 and entities only)", True, int, metavar="K",
           default_doc=f"none where the best chunk's score leads the second's by over {relevance.RERANK_LEAD:g}; "
                       f"else the best {relevance.RERANK_K} within a sixth of the documents' text (at least 2)"),
    Option("engram", "--no-engram", "vanilla: the same prompt, no bias", True, default_doc="on"),
    Option("top_k", "--top-k", "chunks biased, scaled by relevance", False, int,
           default_doc=f"{TOP_K} (reordered: {EDGES_TOP_K})"),
    Option("near", "--near", "strength for a chunk next to the question, rising to the middle's a quarter "
           "of the prompt away", False, float, default_doc=f"+{NEAR:g} dense, +{NEAR_WINDOWED:g} sliding-window/hybrid"),
    Option("mid", "--mid", "strength a quarter to half the prompt before the question (0: none)", False, float,
           default_doc="dense: +2 up to 1.5K tokens, +5 from 3K; else none"),
    Option("granularity", "--granularity", "what of the chunk gets the bias: novel (the chunk less its runs "
           "of 6+ tokens that the question repeats), chunk, sentence, entity, focus (the sentences that match the "
           "question most, the rest of the chunk at half)", False, str, GRANULARITIES,
           default_doc="novel"),
    Option("gate", "--no-gate", "bias every query, the documents' too", False, default_doc="on"),
    Option("reread", "--reread", "with a move: read the moved chunk again at the documents' end instead of "
           "shifting its cells", False, str, move.REREAD, default_doc="never"),
    Option("repeat", "--repeat", "the best chunk's text once more after the documents, right before the question "
           "(valid on every memory, recurrent ones too; the bias goes on the copy)", False, default_doc="off"),
    Option("answer_bias", "--answer-bias", "the bias ends after the answer's first N tokens (0: the question's "
           "queries alone are biased)", False, int, metavar="N", default_doc="the whole answer"),
]


@dataclass
class Settings:
    """What the user or a caller chose; None: the policy's default (resolve)."""
    layers: list[int] | str | None = None   # None: default_layers; "all": every softmax layer; "late": late_layers
    strength: float | None = None
    top_k: int | None = None
    near: float | None = None
    mid: float | None = None          # 0: none
    granularity: str | None = None   # None: the policy's (novel, or a calibrated profile's focus)
    gate: bool = True                 # bias only the question's and the answer's queries
    order: str = "auto"
    reread: str = "never"
    engram: bool = True               # False: vanilla, the same prompt without bias
    rerank: int | None = None         # None: RERANK_K within RERANK_SHARE of the text, 0: off
    repeat: bool = False              # the best chunk once more before the question
    answer_bias: int | None = None    # the answer's tokens whose queries keep the bias; None: all

    def __post_init__(self):
        move.check_reread(self.reread)
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {self.order!r}")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {self.granularity!r}")
        for name in ("strength", "near", "mid"):
            v = getattr(self, name)
            if v is not None and not (v == v and abs(v) < 1e6):
                raise ValueError(f"invalid {name} {v}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"invalid top_k {self.top_k}: at least 1")
        if self.answer_bias is not None and self.answer_bias < 0:
            raise ValueError(f"invalid answer_bias {self.answer_bias}: 0 or more")
        if self.rerank is not None and not 0 <= self.rerank <= 64:
            raise ValueError(f"invalid rerank {self.rerank}: 0 (off) to 64")
        if self.order == "move" and not self.gate:
            raise ValueError("order 'move' needs the query gate: the documents are read before the move")
        if self.order == "move" and self.granularity not in (None, "chunk", "novel"):
            raise ValueError("order 'move' biases the moved chunk by its tokens: granularity must be 'chunk' or 'novel'")


def candidate_settings(c: Candidate, near: float) -> Settings:
    """The settings that carry out one calibration candidate (and a profile that chose it); near:
    the strength next to the question as a share of the peak (policy.near_share)."""
    if c.order == "edges":
        return Settings(order="edges", strength=c.strength, engram=c.strength > 0)
    if not c.strength:
        return Settings(order="keep", engram=False)
    return Settings(order="keep", strength=c.strength, near=c.strength * near, mid=0.0,
                    granularity="novel" if c.focus == "chunk" else "focus", layers="late" if c.layers == "late" else None)


def with_policy(s: Settings, pol: Policy | None) -> Settings:
    """The settings a calibrated policy gives (None: the hand-tuned defaults, s unchanged); what
    the user set explicitly wins, and a strength of the user's own steers even where the profile
    turned the bias off. Order "auto" reorders only where the profile found reordering better."""
    if pol is None or not s.engram:
        return s
    order = ("edges" if pol.reorder else "keep") if s.order == "auto" else s.order
    if order == "edges" and not pol.reorder:  # reordering asked for, not measured better: the hand-tuned one
        return s
    if order == "edges":
        base = candidate_settings(Candidate("", "edges", pol.edges), pol.near)
    elif order == "keep":
        base = candidate_settings(Candidate("", "keep", pol.peak if pol.steer else 0.0, pol.focus, pol.layers), pol.near)
    else:  # move: the hand-tuned move
        return s
    own = {f.name: getattr(s, f.name) for f in fields(Settings)
           if f.name not in ("order", "engram") and getattr(s, f.name) != f.default}
    if s.strength is not None:
        own["engram"] = True
    return replace(base, **own)


def parse_layers(spec: str | None) -> list[int] | str | None:
    """'15-29', '3,7,11', 'all' or None (the default); ValueError with the accepted forms."""
    if spec is None or spec == "default":
        return None
    if spec == "all":
        return "all"
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo or hi - lo > MAX_LAYERS:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
            if not 0 <= out[-1] <= MAX_LAYERS:
                raise ValueError
    except ValueError:
        raise ValueError(f"invalid layers {spec!r}: use e.g. 15-29, 3,7,11 or all") from None
    return sorted(set(out))


def ranges(xs: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5,9'."""
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


# --- the model's side ----------------------------------------------------------------------


def _kinds():
    from ._hook import LayerKind

    return LayerKind


def softmax_layers(kinds) -> list[int]:
    K = _kinds()
    return [il for il, k in enumerate(kinds) if k in (K.FULL, K.SWA)]


def default_layers(kinds) -> list[int]:
    """Hybrids (Qwen3.5: softmax every 4th layer) get every softmax layer; sliding-window models
    (Gemma 3) their global layers, the only ones that reach far; dense models the second half of
    their layers (SmolLM2: 15-29 of 30; all layers hurt the last slot)."""
    K = _kinds()
    soft = softmax_layers(kinds)
    if any(k == K.NONE for k in kinds):
        return soft
    if any(k == K.SWA for k in kinds):
        return [il for il, k in enumerate(kinds) if k == K.FULL]
    return soft[len(soft) // 2:]


def late_layers(kinds) -> list[int]:
    """The last quarter, at least one, of the layers that reach far: every layer of a dense model
    (SmolLM2: 22-29 of 30), the global ones of a sliding-window model, a hybrid's softmax layers."""
    pool = softmax_layers(kinds) if is_dense(kinds) else default_layers(kinds)
    return pool[(3 * len(pool)) // 4:]


def is_dense(kinds) -> bool:
    """Every layer full softmax attention (Llama-style): no sliding-window or recurrent layers."""
    K = _kinds()
    return bool(kinds) and all(k == K.FULL for k in kinds)


def check_layers(layers: list[int] | str | None, kinds) -> list[int]:
    """The layers to bias on this model; ValueError naming the biasable ones otherwise."""
    if layers is None:
        return default_layers(kinds)
    if layers == "all":
        return softmax_layers(kinds)
    if layers == "late":
        return late_layers(kinds)
    soft = set(softmax_layers(kinds))
    for il in layers:
        if il not in soft:
            why = f"the model has {len(kinds)} layers" if il >= len(kinds) or il < 0 else "it has no softmax attention"
            raise ValueError(f"layer {il} cannot take a bias ({why}); biasable: {ranges(sorted(soft))}")
    return list(layers)


def why_not_move(s: Settings, kinds, can_shift: bool) -> str | None:
    """Why this model or these settings cannot take a move (None: they can)."""
    if not (is_dense(kinds) and can_shift):
        # a sliding-window cache no longer holds a far chunk for its local layers, and a recurrent
        # state has read the chunks in their order: shifting positions misleads both
        return ("order 'move' needs a model whose every layer keeps the whole context "
                "(dense, Llama-style); use 'edges' or 'keep' with this one")
    if not s.gate:
        return "order 'move' needs the query gate: the documents are read before the move"
    if s.granularity not in (None, "chunk", "novel"):
        return "order 'move' biases the moved chunk by its tokens: granularity must be 'chunk' or 'novel'"
    return None


def resolve_order(s: Settings, n_tokens: int, kinds, can_shift: bool) -> str:
    """"auto" resolved: ORDER_AUTO from MOVE_FROM prompt tokens where this model and these settings
    can take it, else the given order (vanilla keeps the given order: the same prompt, no bias)."""
    if s.order != "auto":
        return s.order
    if n_tokens < MOVE_FROM or not s.engram or why_not_move(s, kinds, can_shift):
        return "keep"
    return ORDER_AUTO


def chunk_choice(s: Settings, n_tokens: int, dense: bool = True) -> tuple[float, int, float | None, float | None]:
    """Strength, top-k, near-question strength and middle strength for a prompt of n_tokens, the
    order resolved: in the given order the length's strength on the top-1 chunk, NEAR next to the
    question (NEAR_WINDOWED on sliding-window/recurrent models) and, on dense models without a
    strength of one's own, MID(n_tokens) in the middle; reordered, +1 on the best chunk alone;
    moved, MOVE_STRENGTH on it alone."""
    mid = s.mid or None  # 0: none
    if s.order in ("edges", "move"):  # the best chunk next to the question either way
        own = MOVE_STRENGTH if s.order == "move" else EDGES_STRENGTH
        return (s.strength if s.strength is not None else own,
                s.top_k if s.top_k is not None else EDGES_TOP_K, s.near, mid)
    if s.mid is None and s.strength is None and dense:
        mid = MID(n_tokens)
    return (s.strength if s.strength is not None else auto_strength(n_tokens),
            s.top_k if s.top_k is not None else TOP_K,
            s.near if s.near is not None else NEAR if dense else NEAR_WINDOWED, mid)


# --- the plan ------------------------------------------------------------------------------


@dataclass
class Plan:
    """What `ask` does for one prompt. `steered` False: vanilla (no bias at all)."""
    steered: bool
    order: str                          # keep / edges / move, resolved
    layers: list[int]
    strength: float
    near: float | None
    mid: float | None
    top_k: int
    granularity: str
    gate: int | None                    # first query token the bias applies to; None: no bias
    rerank: int                         # chunks reread for the question's likelihood
    selected: list[tuple[relevance.Scored, float]] = field(default_factory=list)
    spans: list[bias_mod.BiasSpan] = field(default_factory=list)
    moved: tuple[int, int] | None = None  # order "move": the tokens shifted to the documents' end
    reread: bool = False                  # order "move": read again there, not shifted
    bias: np.ndarray | None = field(default=None, repr=False)
    repeat: bool = False                  # the best chunk's copy before the question (Settings.repeat)
    answer_bias: int | None = None        # the answer's tokens biased (Settings.answer_bias); None: all

    def to_json(self) -> dict:
        return {"steered": self.steered, "order": self.order, "layers": self.layers,
                "strength": round(self.strength, 4), "near": self.near, "mid": self.mid, "top_k": self.top_k,
                "granularity": self.granularity, "gate_token": self.gate, "rerank": self.rerank,
                "moved_tokens": list(self.moved) if self.moved else None, "reread": self.reread,
                "repeat": self.repeat, "answer_bias": self.answer_bias,
                "spans": [{"chunk": s.chunk_id, "tokens": list(s.tokens), "value": round(s.value, 4), "what": s.what}
                          for s in self.spans]}


def resolve(s: Settings, kinds, can_shift: bool, prompt: Prompt, scored: list[relevance.Scored],
            pm: PointerMap | None, question: str) -> Plan:
    """The one resolution step: settings, the model's layer kinds (and whether its cache can shift)
    and a rendered prompt with its ranked chunks -> the plan `ask` carries out."""
    n = len(prompt.tokens)
    s = replace(s, granularity=s.granularity or "novel")
    order = resolve_order(s, n, kinds, can_shift)
    strength, top_k, near, mid = chunk_choice(replace(s, order=order), n, is_dense(kinds))
    selected = relevance.select(scored, top_k)
    layers = check_layers(s.layers, kinds)
    moved = None
    if order == "move" and selected:
        why = why_not_move(s, kinds, can_shift)
        if why:
            raise ValueError(why)
        a, b = move.moved_span(prompt, selected[0][0].chunk.id)
        # already last: nothing to move (a shift there and back would only re-round the keys)
        moved = (a, b) if b < prompt.question_token else None
    again = bool(moved) and move.rereads(s.reread, prompt, selected[0][0].chunk.id)
    steered = bool(s.engram and selected)
    rerank = sum(sc.lm is not None for sc in scored)  # the chunks the rerank read
    if not steered:
        return Plan(False, order, [], strength, None, None, top_k, s.granularity, None, rerank,
                    selected, [], moved, again, repeat=s.repeat)
    # spans and bias where the cache holds the chunks: the moved chunk at the documents' end
    at = move.moved_prompt(prompt, *moved) if moved else prompt
    b, spans = bias_mod.build(at, selected, strength, s.granularity, pm, question, near=near, mid=mid)
    gate = prompt.question_token if s.gate else 0
    return Plan(True, order, layers, strength, near, mid, top_k, s.granularity, gate, rerank,
                selected, spans, moved, again, b, s.repeat, s.answer_bias)


def markdown_table() -> str:
    """The settings table of docs/PIPELINE.md (`python -m engram_llama.plan` prints it; a test
    checks the doc against it)."""
    rows = ["| setting | flag | default | what it does |", "|---|---|---|---|"]
    for o in OPTIONS:
        where = f"`{o.flag}`" if o.user else f"`{o.flag}` (research only: `python -m research ask`)"
        rows.append(f"| {o.name} | {where} | {o.default_doc} | {o.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
