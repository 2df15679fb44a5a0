"""What the router counts for the report: fallbacks (a backend refused or raised, another served) and calls a
patcher handed back to the library's own code, with one warning per (backend, reason).

Bounded: reasons that name shapes could grow without end in a decode loop or a dynamic-resolution pipeline, so
kinds beyond :data:`MAX_FALLBACK_KINDS` aggregate under :data:`OTHER_REASONS`, and at most
:data:`MAX_WARNINGS_PER_BACKEND` distinct warnings are shown per backend.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter

from attnpatch.core import forksafe
from attnpatch.errors import AttnpatchWarning

FallbackKey = tuple[str, str, str, str]  # (requested chain, refusing backend, serving backend, reason)
MAX_FALLBACK_KINDS = 1024
MAX_WARNINGS_PER_BACKEND = 20
OTHER_REASONS = "(other reasons: more distinct reasons than the report itemises)"

# FallbackKey -> calls. Calls of a kind the router decided before are counted in their Tally and added here when
# the counts are read (fold) or the decision is dropped (release).
fallbacks: Counter[FallbackKey] = Counter()
# (site, reason) -> calls that a patcher passed to the library's own code untouched.
_passthroughs: Counter[tuple[str | None, str]] = Counter()
_warned: set[tuple[str, str]] = set()
_warnings_per_backend: dict[str, int] = {}
_lock = forksafe.Lock()


def note_fallback(spec: str, chosen: str, refused: dict[str, list[str]]) -> tuple[FallbackKey, ...]:
    """Count (and warn once about) each refusal of one call of chain ``spec`` that backend ``chosen`` served;
    returns the keys counted, which the router adds to again for later calls of the same kind."""
    counted = []
    for name, reasons in refused.items():
        for reason in reasons:
            key = (spec, name, chosen, reason)
            if key not in fallbacks and len(fallbacks) >= MAX_FALLBACK_KINDS:
                key = (spec, name, chosen, OTHER_REASONS)  # reasons that name shapes: bounded memory
            fallbacks[key] += 1
            counted.append(key)
            if (name, reason) in _warned:
                continue
            with _lock:
                shown = _warnings_per_backend.get(name, 0) + 1
                if (name, reason) in _warned or shown > MAX_WARNINGS_PER_BACKEND:
                    continue  # past the cap nothing more is kept: reasons that name shapes would grow without bound
                _warned.add((name, reason))
                _warnings_per_backend[name] = shown
            more = (
                f" Further reasons of {name!r} are counted in the report, not shown."
                if shown == MAX_WARNINGS_PER_BACKEND
                else ""
            )
            warnings.warn(
                f"attnpatch: backend {name!r} cannot serve this call ({reason}); using {chosen!r} instead. "
                f"Shown once per reason; the report counts every fallback.{more}",
                AttnpatchWarning,
                stacklevel=_user_stacklevel(),
            )
    return tuple(counted)


class Tally:
    """Calls that fell back exactly as one counted by :func:`note_fallback` did (the same ``keys``): the router adds
    1 to ``calls`` per call of a decided kind, one attribute write instead of one counter update per key."""

    __slots__ = ("calls", "keys")

    def __init__(self, keys: tuple[FallbackKey, ...]) -> None:
        self.keys = keys
        self.calls = 0


# The tallies the router holds, one per set of keys (bounded like the keys): read by fallback_counts, folded and
# forgotten on release.
_live: dict[tuple[FallbackKey, ...], Tally] = {}


def tally(keys: tuple[FallbackKey, ...]) -> Tally | None:
    """The live :class:`Tally` for ``keys``, made on first use (None when nothing fell back: nothing to count).
    Decisions that fall back alike share one: a kind of call decided again (its kernel raised once) adds none."""
    if not keys:
        return None
    counter = _live.get(keys)
    if counter is None:
        counter = _live[keys] = Tally(keys)
    return counter


def _fold(counter: Tally) -> None:
    calls, counter.calls = counter.calls, 0
    if calls:
        for key in counter.keys:
            fallbacks[key] += calls


def release(counters: list[Tally | None]) -> None:
    """Add the calls of ``counters`` to the counts and forget them (the router dropped those decisions)."""
    for counter in counters:
        if counter is not None:
            _fold(counter)
            _live.pop(counter.keys, None)


def _user_stacklevel() -> int:
    # Point a warning at the first frame outside attnpatch and wrapt (the model code that made the call), not at
    # the dispatcher or a patcher's wrapper.
    frame = sys._getframe(2)
    level = 2
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name == "attnpatch" or name.startswith(("attnpatch.", "wrapt", "torch.nn.modules"))):
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return 2


def fallback_counts() -> dict[FallbackKey, int]:
    """(requested chain, refusing backend, serving backend, reason) -> calls, since start or the last reset."""
    for counter in list(_live.values()):
        _fold(counter)
    return dict(fallbacks)


def reset_fallbacks() -> None:
    """Forget the counts and which warnings were shown."""
    fallbacks.clear()
    for counter in list(_live.values()):
        counter.calls = 0
    _passthroughs.clear()
    _warned.clear()
    _warnings_per_backend.clear()


def note_passthrough(site: str | None, reason: str) -> None:
    """A patcher calls this when it hands a call back to the library's own code (counted for the report)."""
    key = (site, reason)
    if key not in _passthroughs and len(_passthroughs) >= MAX_FALLBACK_KINDS:
        key = (site, OTHER_REASONS)
    _passthroughs[key] += 1


def passthrough_counts() -> dict[tuple[str | None, str], int]:
    """(site, reason) -> calls passed to the library's own code, since start or the last reset."""
    return dict(_passthroughs)
