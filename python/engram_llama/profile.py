"""Calibrated profiles: a model's own steering policy, the numbers behind it, found by the model
file's identity.

A profile is a small JSON file keyed by the GGUF file's identity (gguf_check.identity: its
architecture, size and the SHA-256 of its header, which holds every tensor's name, shape and type
and the metadata), so another quantisation, or a fine-tune whose header or size differs, does not
inherit one. `engram-llama calibrate` writes it to the cache folder; `run`, `serve` and the API
find it there, else among the built-in profiles shipped with the package, else fall back to the
hand-tuned family defaults ("uncalibrated"). A profile for another model, of another policy
version, or that does not parse is refused with one line, never applied.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .gguf_check import identity
from .policy import POLICY_VERSION, Policy

FORMAT = "engram-llama-profile"
MAX_BYTES = 1 << 20  # a profile is a few KB; its measured table with it stays far below this
BUILTIN = Path(__file__).resolve().parent / "profiles"


class ProfileError(ValueError):
    """A profile that cannot be used: its message is one line for the user."""


def cache_dir() -> Path:
    """$ENGRAM_LLAMA_CACHE, else $XDG_CACHE_HOME/engram-llama, else ~/.cache/engram-llama."""
    if os.environ.get("ENGRAM_LLAMA_CACHE"):
        return Path(os.environ["ENGRAM_LLAMA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "engram-llama"


def key(ident: dict) -> str:
    """The file name a model's profile has: architecture and the header digest's first 16 digits."""
    return f"{ident['architecture']}-{ident['header_sha256'][:16]}"


@dataclass
class Profile:
    policy: Policy
    model: dict                 # the identity it was measured on
    measured: dict = field(default_factory=dict)  # how: tasks, lengths, n, the table per candidate and slot
    tool: str = ""              # the engram-llama version that wrote it
    path: Path | None = None    # where it was read from

    def to_json(self) -> dict:
        return {"format": FORMAT, "policy_version": POLICY_VERSION, "tool": self.tool, "model": self.model,
                "policy": self.policy.to_json(), "measured": self.measured}


def read(path: str | os.PathLike, ident: dict | None = None) -> Profile:
    """The profile in path, checked against the model's identity; ProfileError (one line) when it
    does not parse, is of another policy version or is another model's."""
    p = Path(path)
    try:
        size = p.stat().st_size
        big = size > MAX_BYTES  # a model file given by mistake: not read whole
        d = None if big else json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ProfileError(f"cannot read profile {p}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise ProfileError(f"profile {p} is corrupt (not JSON)") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ProfileError(f"{p} is not an engram-llama profile" + (f" ({size >> 20} MiB)" if big else ""))
    if d.get("policy_version") != POLICY_VERSION:
        raise ProfileError(f"profile {p} is of policy version {d.get('policy_version')}, this engram-llama reads "
                           f"{POLICY_VERSION}: run `engram-llama calibrate` again")
    try:
        pol = Policy.from_json(d.get("policy"))
        model = d["model"]
        if not isinstance(model, dict) or not isinstance(model.get("header_sha256"), str):
            raise ValueError("no model identity")
    except (ValueError, TypeError, KeyError) as e:
        raise ProfileError(f"profile {p} is corrupt ({e})") from None
    if ident is not None and (model.get("header_sha256"), model.get("size")) != (ident["header_sha256"], ident["size"]):
        raise ProfileError(f"profile {p} was measured on another model file ({model.get('architecture')}, "
                           f"{model.get('size')} bytes), not this one")
    measured = d.get("measured") if isinstance(d.get("measured"), dict) else {}
    return Profile(pol, model, measured, str(d.get("tool", "")), p)


def find(model_path: str | os.PathLike, warn=None) -> Profile | None:
    """The model's profile: the cache folder's, else a built-in one, else None (uncalibrated).
    One that is found but unusable is skipped with a line to `warn`."""
    ident = identity(model_path)
    try:
        folders = [cache_dir() / "profiles", BUILTIN]
    except RuntimeError as e:  # no home folder
        folders = [BUILTIN]
        if warn:
            warn(f"no cache folder ({e}); set ENGRAM_LLAMA_CACHE")
    for folder in folders:
        p = folder / f"{key(ident)}.json"
        try:
            if not p.exists():
                continue
            return read(p, ident)
        except (ProfileError, OSError) as e:
            if warn:
                warn(f"{e if isinstance(e, ProfileError) else f'cannot read {p}: {e.strerror or e}'}; ignored")
    return None


def write(profile: Profile, path: str | os.PathLike) -> Path:
    """Write atomically: a temporary file in the same folder, then renamed over the target, so a
    failure or Ctrl-C leaves the old profile or none, never half of one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".profile-", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(profile.to_json(), f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def describe(profile: Profile | None) -> dict:
    """What --json and --explain say about the policy in force."""
    if profile is None:
        return {"calibrated": False, "policy": "hand-tuned family defaults",
                "hint": "run `engram-llama calibrate MODEL.gguf` to measure this model"}
    return {"calibrated": True, "file": str(profile.path) if profile.path else None, "policy": profile.policy.label,
            "steering": "on" if profile.policy.steer or profile.policy.reorder else "off"}
