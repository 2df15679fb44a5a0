"""Which backend can serve a call: each backend's reasons (cached per call kind), ``auto``'s ranking, and a
chain's *lead* on a device, the router's shortcut for calls whose backend does not depend on the call's shapes.

The router (:mod:`attnpatch.core.dispatch`) walks a chain's members and asks :func:`reasons` of each; this module
holds what that walk needs and no routing state of its own beyond the reasons cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from attnpatch.core import hooks, registry, selection
from attnpatch.core.call import CallSpec
from attnpatch.core.registry import Backend
from attnpatch.core.selection import AUTO, Chain

# (backend name, call) -> reasons. Bounded: reasons per call kind are recomputed after the cache is dropped.
_reason_cache: dict[tuple[str, CallSpec], list[str]] = {}
MAX_REASON_CACHE = 4096


def forget() -> None:
    """Drop the cached reasons (the registry changed: availability, emulation, a backend replaced)."""
    _reason_cache.clear()


def reasons(backend: Backend, call: CallSpec) -> list[str]:
    """Why ``backend`` cannot serve ``call`` (empty: it can); cached per (backend, call kind) outside tracing."""
    if call.compiling:  # a traced write to a global cache cannot be replayed; tracing happens once anyway
        return backend.call_reasons(call)
    cache_key = (backend.name, call)
    found = _reason_cache.get(cache_key)
    if found is None:
        found = backend.call_reasons(call)
        if len(_reason_cache) >= MAX_REASON_CACHE:
            _reason_cache.clear()
        _reason_cache[cache_key] = found
    return found


def candidates(chain: Chain, strict: bool) -> Iterator[Backend | str]:
    """The members of ``chain`` in the order to try them, then ``native`` where it is implicit (not in strict mode)."""
    yield from chain.members
    if chain.implicit_native and not strict:
        yield registry.get_backend("native")


def auto_candidates(call: CallSpec) -> list[Backend]:
    """Backends `auto` may pick for ``call``, best first: available, serving it, not lossy unless allowed."""
    ranked = [backend for backend in _auto_pool(call.device_type) if not reasons(backend, call)]
    ranked.sort(key=lambda b: -b.caps.priority_for(call.device_type))
    return ranked


def _auto_pool(device_type: str) -> list[Backend]:
    # The backends auto considers at all, before any call's reasons: reference and placeholder built-ins (priority
    # <= 0 on this device) are never picked automatically, lossy ones only when allowed.
    allow_lossy = selection.allow_lossy()
    return [
        backend
        for backend in registry.list_backends()
        if not (backend.caps.lossy and not allow_lossy)
        and not (backend.builtin and backend.caps.priority_for(device_type) <= 0)
    ]


def pick_auto(call: CallSpec, args: tuple[Any, ...], extra: dict[str, Any]) -> Backend | str:
    """The backend ``auto`` picks for ``call`` (the auto chooser of :mod:`attnpatch.core.hooks` may time the
    candidates on ``args``), or the string ``auto`` when none can serve it."""
    ranked = auto_candidates(call)
    if not ranked:
        return AUTO
    chooser = hooks.auto_chooser()
    # The chooser times candidates on ``args``, which lack the later arguments: it would time another call.
    if chooser is not None and len(ranked) > 1 and not call.compiling and not extra:
        return chooser(call, ranked, args)
    return ranked[0]


def _refuses_every_call(backend: Backend, call: CallSpec) -> bool:
    # True when the backend refuses every call on this call's device for the same reasons: it is unavailable in this
    # process, or it accepts everything except this device type.
    if backend.reasons:
        return True
    caps = backend.caps
    if backend.check is not None or caps.devices is None or call.device_type in caps.devices:
        return False
    return dataclasses.replace(caps, devices=None).accepts_everything()


def lead(chain: Chain, call: CallSpec, strict: bool) -> tuple[Backend, dict[str, list[str]]] | None:
    """The backend that serves every call without later arguments on ``call``'s device for ``chain``, and the
    refusals (member -> reasons, the same for every such call) of the members before it; None when that depends on
    more than the device (a member with rules, ``auto`` with a chooser or with rules at the top).

    The router keys this by (chain, device): such calls skip the per-call decision key (shapes, dtypes, grad).
    """
    refused: dict[str, list[str]] = {}
    for member in candidates(chain, strict):
        if member == AUTO:
            pool = [b for b in _auto_pool(call.device_type) if not _refuses_every_call(b, call)]
            if not pool:
                return None
            pool.sort(key=lambda b: -b.caps.priority_for(call.device_type))
            if len(pool) > 1 and hooks.auto_chooser() is not None:
                return None
            top = pool[0]
            return (top, refused) if top.serves_every_call else None
        assert isinstance(member, Backend)
        if member.serves_every_call:
            return member, refused
        if not _refuses_every_call(member, call) or strict:
            return None
        refused[member.name] = reasons(member, call)
    return None


def all_reasons(chain: Chain, call: CallSpec, refused: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every member of ``chain`` -> its reasons for ``call`` (those already known from ``refused`` kept)."""
    everything = dict(refused)
    for member in chain.members:
        if isinstance(member, Backend) and member.name not in everything:
            everything[member.name] = reasons(member, call)
    return everything


def unsupported_message(chain: Chain, call: CallSpec, refused: dict[str, list[str]], strict: bool) -> str:
    """The one-line error when no member of ``chain`` serves ``call``: every candidate and its reasons."""
    everything = all_reasons(chain, call, refused)
    parts = [
        f"{name}: {'; '.join(r) if r else 'could serve it (not tried: strict mode allows no fallback)'}"
        for name, r in everything.items()
    ]
    mode = "strict mode: no fallback" if strict else "no backend left"
    # Strict mode is set by ATTNPATCH_STRICT, the runner's --strict or set_strict: name every switch.
    fix = (
        ", or turn strict mode off (unset ATTNPATCH_STRICT, drop --strict, or attnpatch.set_strict(False)) to fall back"
        if strict
        else ""
    )
    return (
        f"no backend of {chain.spec!r} can serve this attention call ({mode}; {call.describe()}). "
        + " | ".join(parts)
        + f". Fix: choose another backend (python -m attnpatch list){fix}."
    )
