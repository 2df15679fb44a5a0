"""Every ``ATTNPATCH_*`` environment variable, in one place: its name, meaning and parsing.

This module is imported by the interpreter-start hook, so it imports nothing but the standard library.
Values are read when asked for (not cached at import) so tests and the runner can change them.
Nothing read here is ever imported or executed as code.
"""

from __future__ import annotations

import os


class Variable:
    """One variable: its name, what it does, an example value. (A plain class: `dataclasses` costs ~10 ms at
    interpreter start, and this module is on the startup path.)"""

    __slots__ = ("example", "meaning", "name")

    def __init__(self, name: str, meaning: str, example: str) -> None:
        self.name = name
        self.meaning = meaning
        self.example = example


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "ATTNPATCH_BACKEND",
        "Backend name or fallback chain to route attention to; setting it activates the startup hook.",
        "flash  |  sage,flash,native  |  auto",
    ),
    Variable(
        "ATTNPATCH_PLAN",
        "Attention plan (python -m attnpatch tune writes one): each layer's backend per denoising step; setting it "
        "activates the startup hook.",
        "plan.json",
    ),
    Variable(
        "ATTNPATCH_DISABLE",
        "Off switch that wins over everything: the startup hook, the runner and install() do nothing.",
        "1",
    ),
    Variable(
        "ATTNPATCH_STRICT",
        "Raise instead of falling back; an invalid ATTNPATCH_BACKEND exits with status 2 at startup.",
        "1",
    ),
    Variable("ATTNPATCH_CHECKS", "Debug checks of device, dtype, shape and masks on every call.", "1"),
    Variable("ATTNPATCH_ALLOW_LOSSY", "Let `auto` pick lossy (int8/fp8) backends.", "1"),
    Variable(
        "ATTNPATCH_REPORT", "Print a routing report at exit; a path ending in .json also writes JSON.", "1 | out.json"
    ),
    Variable(
        "ATTNPATCH_VERIFY",
        "Recompute sampled calls in float64: 1 = first call per module and shape, N = every Nth.",
        "1 | 10",
    ),
    Variable(
        "ATTNPATCH_VERIFY_ACTION", "What a verify failure does: warn, fallback (module -> native) or raise.", "warn"
    ),
    Variable("ATTNPATCH_AUTOTUNE", "With backend `auto`: time the candidates per call kind and keep the fastest.", "1"),
    Variable(
        "ATTNPATCH_CACHE_DIR",
        "Where the autotune cache and the Hub lock file (hub-lock.json) live (default: the user cache dir).",
        "~/.cache/attnpatch",
    ),
    Variable(
        "ATTNPATCH_TRUST_HUB_KERNELS",
        "Opt in to download and run attention kernels from the Hugging Face Hub: 1, true, yes or on; anything else "
        "is no.",
        "1",
    ),
    Variable(
        "ATTNPATCH_HUB_TRUST_REMOTE_CODE",
        "Hub repositories the kernels package may load although the Hub does not mark their publisher trusted.",
        "SageAttention/sage-attention,SageAttention/sage-blackwell",
    ),
)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def raw(name: str) -> str | None:
    """The variable's value stripped of whitespace, or None when unset or empty."""
    value = os.environ.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def flag(name: str) -> bool:
    """A boolean variable. Unknown spellings count as set, since a user who wrote anything meant 'on'."""
    value = raw(name)
    if value is None:
        return False
    return value.lower() not in _FALSE


def disabled() -> bool:
    return flag("ATTNPATCH_DISABLE")


def backend() -> str | None:
    return raw("ATTNPATCH_BACKEND")


def plan() -> str | None:
    return raw("ATTNPATCH_PLAN")


def strict() -> bool:
    return flag("ATTNPATCH_STRICT")


def checks() -> bool:
    return flag("ATTNPATCH_CHECKS")


def allow_lossy() -> bool:
    return flag("ATTNPATCH_ALLOW_LOSSY")


def describe() -> str:
    """The variables as an aligned text block, for ``--help`` and the README."""
    width = max(len(v.name) for v in VARIABLES)
    lines = [f"  {v.name:<{width}}  {v.meaning} (e.g. {v.example})" for v in VARIABLES]
    return "\n".join(lines)
