"""The steering policy, in one place: which chunk is biased, how strongly at its distance from the
question, over which of its tokens, and in which order the chunks stand.

Two sources. A calibrated profile (profile.py) holds a `Policy`: a handful of numbers measured on
the user's own model by `engram-llama calibrate` (calibrate.py), which may also say "off" when no
candidate beat vanilla there. A model without one gets the hand-tuned family defaults below,
chosen on SmolLM2-135M and Gemma-3-270M development items (docs/EVAL.md) and labelled
"uncalibrated" wherever a plan is shown.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# --- the hand-tuned family defaults (uncalibrated models) --------------------------------------


def by_length(n_tokens: int, lo: float, hi: float, at_lo: float, at_hi: float) -> float:
    """at_lo up to lo tokens, at_hi from hi, linear in log2 of the length between."""
    t = np.log2(max(n_tokens, 1) / lo) / np.log2(hi / lo)
    return float(at_lo + (at_hi - at_lo) * np.clip(t, 0.0, 1.0))


def auto_strength(n_tokens: int) -> float:
    """The strength at the prompt's start: a passage's share of attention falls as the keys it
    competes with grow, so the bias grows with the context. SmolLM2: +2 best at ~2K tokens (+3/+4
    lose the last slot), +4 at ~4K (docs/PIPELINE.md, "The evidence behind the defaults")."""
    return by_length(n_tokens, 2048, 4096, 2.0, 4.0)


MID_FROM, MID_FULL = 1536, 3072


def mid_strength(n_tokens: int, lo: float = MID_FROM, hi: float = MID_FULL) -> float:
    """The middle's strength on dense models: +2 up to `lo` prompt tokens, +5 from `hi`."""
    return by_length(n_tokens, lo, hi, 2.0, 5.0)


TOP_K = 1                 # the best chunk alone (top-3: -11 answers over three sets)
NEAR = 2.0                # next to the question, dense models
NEAR_WINDOWED = 3.0       # next to the question, sliding-window and recurrent models
MID = mid_strength        # a quarter to half the prompt before the question, dense models
EDGES_STRENGTH, EDGES_TOP_K = 1.0, 1   # reordered: +1 on the best chunk, which sits last
MOVE_STRENGTH = 2.0       # the moved chunk (order "move")
ORDER_AUTO, MOVE_FROM = "move", 6144   # "auto": move from 6144 prompt tokens where a move is valid

# --- the calibrated policy ---------------------------------------------------------------------

# the strength next to the question, as a share of the peak: the hand-tuned defaults' ratio at ~4K,
# +2 of +4 on dense models and +3 of +4 on sliding-window and recurrent ones. Small models read the
# last chunk anyway (recency): on dense ones a full bias there costs the last slot; on windowed ones
# +3 beat +2 there (docs/ABLATIONS.md, "The strength next to the question on sliding-window models"),
# and a calibrated +2 lost that slot to the defaults' +3 (docs/EVAL.md section 4, Gemma's bulletins)
NEAR_SHARE_V1 = 0.5       # every family, in profiles written before the share was recorded


def near_share(dense: bool) -> float:
    """The calibrated policy's strength next to the question, as a share of its peak."""
    return (NEAR if dense else NEAR_WINDOWED) / auto_strength(4096)


# focus "sentences": the rest of the chunk, around its sentences that match the question best,
# at bias.REST (0.5) of their strength
FOCI = ("chunk", "sentences")
# which layers take the bias: "default", the family's (plan.default_layers), or "late", the last
# quarter of those that reach far (plan.late_layers). Calibrate offers "late" on dense models only:
# there biasing SmolLM2's last quarter alone kept the middle's gain with a fifth of the recitals on
# development items (docs/ABLATIONS.md, "Which layers recite"); on Gemma 3 its last global layer
# alone gained nothing
LAYER_SHAPES = ("default", "late")
# bumped whenever a field's meaning changes: a profile of another policy version is refused
POLICY_VERSION = 1


@dataclass(frozen=True)
class Policy:
    """What a calibrated profile holds: two choices, one per kind of chunk order.

    In the given order (a document read in order, chat history, or retrieved chunks when reordering
    did not win): steer False leaves them unbiased (calibration found nothing that beat vanilla);
    else the best chunk gets `peak` from a quarter of the prompt before the question on, `near` (a
    share) of it next to the question (linear between; the share is the model family's, near_share,
    recorded as measured), over `focus`: "chunk" (the chunk less its echoes
    of the question) or "sentences" (the sentences or lines that match the question most, the rest
    of the chunk at half of that, bias.REST), at `layers` (LAYER_SHAPES).
    For chunks whose order means nothing (retrieved ones; the order "auto"): reorder True puts the
    best last and the next best first, then `edges` on the best (0: none)."""
    steer: bool = False
    peak: float = 0.0
    focus: str = "chunk"
    reorder: bool = False
    edges: float = 0.0
    near: float = NEAR_SHARE_V1
    layers: str = "default"

    def __post_init__(self):
        if not isinstance(self.steer, bool) or not isinstance(self.reorder, bool):
            raise ValueError("steer and reorder are true or false")
        if self.focus not in FOCI:
            raise ValueError(f"focus {self.focus!r}: one of {', '.join(FOCI)}")
        if self.layers not in LAYER_SHAPES:
            raise ValueError(f"layers {self.layers!r}: one of {', '.join(LAYER_SHAPES)}")
        for name in ("peak", "edges"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 16:
                raise ValueError(f"{name} {v!r}: a number from 0 to 16")
        if isinstance(self.near, bool) or not isinstance(self.near, (int, float)) or not 0 <= self.near <= 1:
            raise ValueError(f"near {self.near!r}: a share of the peak, from 0 to 1")

    @property
    def label(self) -> str:
        given = (f"+{self.peak:g} on the best chunk ({self.focus}), +{self.peak * self.near:g} next to the question"
                 + (", the last quarter of layers" if self.layers == "late" else "") if self.steer else "no bias")
        if not self.reorder:
            return f"given order: {given}; retrieved chunks: the same"
        return f"given order: {given}; retrieved chunks: reordered, best last" + (f", +{self.edges:g} on it" if self.edges else "")

    def to_json(self) -> dict:
        d = asdict(self)
        if self.layers == "default":  # as profiles before the field: older versions read them still
            del d["layers"]
        return d

    @classmethod
    def from_json(cls, d) -> "Policy":
        # without "near": a profile written before the share was recorded, measured at NEAR_SHARE_V1;
        # without "layers": one written before calibrate chose them, measured at the family's
        if not isinstance(d, dict) or set(d) - {"near", "layers"} != {"steer", "peak", "focus", "reorder", "edges"}:
            raise ValueError("not a policy")
        return cls(**d)


@dataclass(frozen=True)
class Candidate:
    """One setting calibrate measures: in the given order (peak, focus) or reordered (edges)."""
    name: str
    order: str            # "keep" or "edges"
    strength: float       # peak (keep) or edges (edges); 0 with keep is vanilla
    focus: str = "chunk"
    layers: str = "default"


# What calibrate measures besides vanilla and the hand-tuned defaults: where the bias goes inside
# the chunk (two shapes) at two strengths in the given order (one prefill per placement: the query
# gate makes every candidate exact on the cached documents), and reordering with and without +1
# on the best chunk (one prefill per item); on dense models also the last quarter of layers.
# Small on purpose: six or seven, not a sweep over every knob.
CANDIDATES = [Candidate("chunk+2", "keep", 2.0), Candidate("chunk+4", "keep", 4.0),
              Candidate("sentences+2", "keep", 2.0, "sentences"), Candidate("sentences+4", "keep", 4.0, "sentences"),
              Candidate("reorder", "edges", 0.0), Candidate("reorder+1", "edges", 1.0)]
LATE = Candidate("late+4", "keep", 4.0, "chunk", "late")
VANILLA = Candidate("vanilla", "keep", 0.0)


def candidates(dense: bool) -> list[Candidate]:
    """What calibrate measures on a model: the late layers only where the default is the second
    half of every layer (dense); elsewhere the default layers are already few and far-reaching."""
    return CANDIDATES[:4] + [LATE] + CANDIDATES[4:] if dense else list(CANDIDATES)
