"""The attention dispatcher: one call, many backends.

Selection precedence, most specific wins::

    per-call ``backend=``  >  per-module (apply / set_attention_backend)  >  ``attention_backend()`` context
        >  process default (``set_default_backend`` / ATTNPATCH_BACKEND)  >  ``native``

A selection is a backend name, an alias, ``auto``, or a fallback chain ``"sage,flash,native"``. A call the first
backend cannot serve goes to the next one that can, with one warning per (backend, reason) and a count kept for
the report; a chain always ends in ``native`` unless strict mode is on, in which case the first backend must
serve the call or an :class:`~attnpatch.errors.UnsupportedCall` lists every candidate and its reasons.

Selection state lives in a ``threading.local`` whose class has defaults (no per-thread fallback lookups) and in
module globals: both are thread-safe and read by torch.compile without graph breaks, unlike ContextVar.get.
"""

from __future__ import annotations

import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ContextDecorator
from dataclasses import dataclass
from typing import Any

import torch

from attnpatch import env, masks, registry
from attnpatch.errors import AttnpatchWarning, CheckFailed, UnsupportedCall
from attnpatch.registry import MASK_NONE, Backend, CallSpec

AUTO = "auto"


@dataclass(frozen=True, eq=False)
class Chain:
    """A resolved selection. ``members`` holds Backends and the string "auto", in the order to try them."""

    spec: str
    members: tuple[Backend | str, ...]
    implicit_native: bool
    # Set when the first member can serve every call: the dispatcher calls it with no per-call check.
    fast: Backend | None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m if isinstance(m, str) else m.name for m in self.members)

    def __repr__(self) -> str:
        return f"Chain({self.spec!r})"


class _Local(threading.local):
    # Class attributes are the per-thread defaults: reading them costs no fallback lookup.
    context: Chain | None = None
    module: Chain | None = None
    site: str | None = None


_local = _Local()
_chains: dict[str, Chain] = {}
_default: Chain | None = None  # None until first use: resolving "native" imports the backends
_strict: bool = env.strict()
_checks: bool = env.checks()
_allow_lossy: bool = env.allow_lossy()

# Observers see every routed call (report, verify). While the list is empty the fast path skips them entirely.
_observers: list[Callable[[CallRecord], None]] = []
# Picks a backend for `auto` among candidates that can serve the call (the autotuner plugs in here).
_auto_chooser: Callable[[CallSpec, list[Backend], tuple[Any, ...]], Backend] | None = None

_fallbacks: Counter[tuple[str, str, str, str]] = Counter()
# (site, reason) -> calls that a patcher passed to the library's own code untouched (softcap, return_lse, ...).
_passthroughs: Counter[tuple[str | None, str]] = Counter()
_warned: set[tuple[str, str]] = set()
_reason_cache: dict[tuple[str, CallSpec], list[str]] = {}
_lock = threading.Lock()


@dataclass
class CallRecord:
    """One routed call, as observers see it. Tensors are in the dispatcher layout (B, S, H, D)."""

    site: str | None
    requested: str
    served: str
    refused: dict[str, list[str]]
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    dropout_p: float
    is_causal: bool
    scale: float | None
    output: torch.Tensor


def _clear_caches() -> None:
    global _default
    _chains.clear()
    _reason_cache.clear()
    if _default is not None:
        _default = resolve(_default.spec)


registry.on_change(_clear_caches)


def resolve(selection: str | Chain) -> Chain:
    """Resolve a backend name, alias, ``auto`` or comma-separated chain; raises UnknownBackendError."""
    if isinstance(selection, Chain):
        return selection
    chain = _chains.get(selection)
    if chain is not None:
        return chain
    if not isinstance(selection, str):
        raise TypeError(f"backend must be a name like 'flash' or a chain like 'sage,native', got {selection!r}")
    parts = [p.strip() for p in selection.split(",") if p.strip()]
    if not parts:
        raise registry.UnknownBackendError(registry.unknown_message(selection))
    members: list[Backend | str] = []
    for part in parts:
        if part.lower() == AUTO:
            members.append(AUTO)
        else:
            members.append(registry.get_backend(part))
    native = registry.get_backend("native")
    implicit = native not in members and AUTO not in members
    first = members[0]
    fast = first if isinstance(first, Backend) and first.serves_every_call else None
    chain = Chain(
        spec=",".join(m if isinstance(m, str) else m.name for m in members),
        members=tuple(members),
        implicit_native=implicit,
        fast=fast,
    )
    _chains[selection] = chain
    return chain


def default_chain() -> Chain:
    global _default
    if _default is None:
        _default = resolve("native")
    return _default


def dispatch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention on the selected backend.

    query: (batch, seq_q, heads, head_dim); key: (batch, seq_kv, heads_kv, head_dim);
    value: (batch, seq_kv, heads_kv, head_dim_v) -> out: (batch, seq_q, heads, head_dim_v).
    heads_kv may divide heads (GQA/MQA) with or without ``enable_gqa``.
    attn_mask: bool/integer (True = attend) or additive float; (batch, seq_kv) key padding,
        (batch, seq_q, seq_kv) or (batch|1, 1|heads, seq_q|1, seq_kv). Query rows with no key to attend give 0.
    is_causal: top-left aligned like torch's SDPA; may be combined with attn_mask (both apply).
    backend: per-call selection (name, alias, ``auto`` or chain), overriding every other setting.
    """
    # Fast path, kept inline (each Python call level costs ~0.1 us): no per-call backend, no mask, no checks,
    # no observers, and a selection whose first backend serves every call.
    if backend is None and attn_mask is None and not _checks and not _observers:
        local = _local
        chain = local.module or local.context or _default
        if chain is not None and chain.fast is not None:
            return chain.fast.fn(query, key, value, None, dropout_p, is_causal, scale, enable_gqa)
    return route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, None)


def route(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    backend: str | Chain | None,
    module_chain: Chain | None,
    site: str | None = None,
) -> torch.Tensor:
    """:func:`dispatch_attention` for adapters.

    ``module_chain`` is the per-module selection, if any; ``site`` names the calling module for the report
    (default: the site set by :func:`push_module`).
    """
    if backend is not None:
        chain = resolve(backend)
    else:
        chain = module_chain or _local.module or _local.context or _default or default_chain()
    if _checks:
        run_checks(query, key, value, attn_mask, is_causal, chain)
    kind = MASK_NONE
    if attn_mask is not None:
        attn_mask, kind = masks.normalize(attn_mask, query, key)
        if is_causal:
            attn_mask, kind = masks.fold_causal(attn_mask, kind, query.shape[1], key.shape[1])
            is_causal = False
    fast = chain.fast
    if fast is not None and not _observers:
        return fast.fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return _route_slow(chain, query, key, value, attn_mask, kind, dropout_p, is_causal, scale, enable_gqa, site)


def _route_slow(
    chain: Chain,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    kind: str,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    site: str | None,
) -> torch.Tensor:
    call = CallSpec.of(query, key, value, kind, dropout_p, is_causal, scale)
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    refused: dict[str, list[str]] = {}
    chosen: Backend | None = None
    for member in _candidates(chain):
        backend = _pick_auto(call, args) if member == AUTO else member
        if isinstance(backend, str):  # auto found nothing; its reasons are already recorded below
            refused[AUTO] = ["no registered backend can serve this call"]
            continue
        reasons = _reasons(backend, call)
        if not reasons:
            chosen = backend
            break
        refused[backend.name] = reasons
        if _strict:
            break
    if chosen is None or (refused and _strict):
        raise UnsupportedCall(_unsupported_message(chain, call, refused), _all_reasons(chain, call, refused))
    if refused and not call.compiling:
        _note_fallback(chain, chosen, refused)
    out = chosen.fn(*args)
    if _observers and not call.compiling:
        record = CallRecord(
            site or _local.site,
            chain.spec,
            chosen.name,
            refused,
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            out,
        )
        for observer in list(_observers):
            observer(record)
    return out


def _candidates(chain: Chain) -> Iterator[Backend | str]:
    yield from chain.members
    if chain.implicit_native and not _strict:
        yield registry.get_backend("native")


def _reasons(backend: Backend, call: CallSpec) -> list[str]:
    if call.compiling:  # a traced write to a global cache cannot be replayed; tracing happens once anyway
        return backend.call_reasons(call)
    cache_key = (backend.name, call)
    reasons = _reason_cache.get(cache_key)
    if reasons is None:
        reasons = backend.call_reasons(call)
        _reason_cache[cache_key] = reasons
    return reasons


def auto_candidates(call: CallSpec) -> list[Backend]:
    """Backends `auto` may pick for ``call``, best first: available, serving it, not lossy unless allowed."""
    ranked = []
    for backend in registry.list_backends():
        if backend.caps.lossy and not _allow_lossy:
            continue
        if backend.builtin and backend.caps.priority_for(call.device_type) <= 0:
            continue  # reference and placeholder backends are never picked automatically
        if not _reasons(backend, call):
            ranked.append(backend)
    ranked.sort(key=lambda b: -b.caps.priority_for(call.device_type))
    return ranked


def _pick_auto(call: CallSpec, args: tuple[Any, ...]) -> Backend | str:
    candidates = auto_candidates(call)
    if not candidates:
        return AUTO
    if _auto_chooser is not None and len(candidates) > 1 and not call.compiling:
        return _auto_chooser(call, candidates, args)
    return candidates[0]


def _note_fallback(chain: Chain, chosen: Backend, refused: dict[str, list[str]]) -> None:
    for name, reasons in refused.items():
        for reason in reasons:
            _fallbacks[(chain.spec, name, chosen.name, reason)] += 1
            if (name, reason) in _warned:
                continue
            with _lock:
                if (name, reason) in _warned:
                    continue
                _warned.add((name, reason))
            warnings.warn(
                f"attnpatch: backend {name!r} cannot serve this call ({reason}); using {chosen.name!r} instead. "
                "Shown once per reason; the report counts every fallback.",
                AttnpatchWarning,
                stacklevel=4,
            )


def _all_reasons(chain: Chain, call: CallSpec, refused: dict[str, list[str]]) -> dict[str, list[str]]:
    everything = dict(refused)
    for member in chain.members:
        if isinstance(member, Backend) and member.name not in everything:
            everything[member.name] = _reasons(member, call)
    return everything


def _unsupported_message(chain: Chain, call: CallSpec, refused: dict[str, list[str]]) -> str:
    everything = _all_reasons(chain, call, refused)
    parts = [
        f"{name}: {'; '.join(r) if r else 'could serve it (not tried: strict mode allows no fallback)'}"
        for name, r in everything.items()
    ]
    mode = "strict mode: no fallback" if _strict else "no backend left"
    return (
        f"no backend of {chain.spec!r} can serve this attention call ({mode}; {describe_call(call)}). "
        + " | ".join(parts)
        + ". Fix: choose another backend (python -m attnpatch list), or unset ATTNPATCH_STRICT to fall back."
    )


def describe_call(call: CallSpec) -> str:
    return (
        f"{call.device_type} {registry.dtype_name(call.dtype)}, heads {call.heads_q}/{call.heads_kv}, "
        f"seq {call.seq_q}x{call.seq_kv}, head_dim {call.head_dim}, mask {call.mask_kind}"
        + (", causal" if call.is_causal else "")
        + (", dropout" if call.dropout else "")
    )


def run_checks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    chain: Chain,
) -> None:
    """Debug checks (ATTNPATCH_CHECKS=1 / set_checks(True)): raise CheckFailed naming tensor, value and rule."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise CheckFailed(f"{name} has shape {tuple(t.shape)}: must be 4-D (batch, seq, heads, head_dim)")
    for name, t in (("key", key), ("value", value)):
        if t.device != query.device:
            raise CheckFailed(f"{name} is on {t.device}, query on {query.device}: move them to one device")
        if t.dtype != query.dtype:
            raise CheckFailed(f"{name} is {t.dtype}, query {query.dtype}: q, k and v must share one dtype")
        if t.shape[0] != query.shape[0]:
            raise CheckFailed(f"{name} batch {t.shape[0]} != query batch {query.shape[0]}")
    if key.shape[1] != value.shape[1] or key.shape[2] != value.shape[2]:
        raise CheckFailed(
            f"key (seq {key.shape[1]}, heads {key.shape[2]}) and value (seq {value.shape[1]}, heads "
            f"{value.shape[2]}) must have the same seq_kv and heads"
        )
    if query.shape[2] % key.shape[2]:
        raise CheckFailed(
            f"query heads {query.shape[2]} is not a multiple of key/value heads {key.shape[2]} (GQA needs "
            "heads_q % heads_kv == 0)"
        )
    if query.shape[3] != key.shape[3]:
        raise CheckFailed(f"query head_dim {query.shape[3]} != key head_dim {key.shape[3]}")
    if attn_mask is not None:
        if attn_mask.device != query.device:
            raise CheckFailed(f"attn_mask is on {attn_mask.device}, query on {query.device}")
        if is_causal:
            raise CheckFailed(
                "attn_mask given together with is_causal=True: SDPA rejects this; attnpatch would apply both, "
                "which is rarely what a caller meant. Fold causality into the mask, or drop one of them"
            )
        masks.normalize(attn_mask, query, key)  # raises CheckFailed on a shape that does not broadcast
    for member in chain.members:
        if isinstance(member, Backend) and member.caps.dtypes is not None and query.dtype not in member.caps.dtypes:
            names = ", ".join(sorted(registry.dtype_name(d) for d in member.caps.dtypes))
            warnings.warn(
                f"attnpatch checks: query dtype {registry.dtype_name(query.dtype)} is not one backend "
                f"{member.name!r} runs ({names}); the call will fall back",
                AttnpatchWarning,
                stacklevel=4,
            )


class attention_backend(ContextDecorator):  # noqa: N801 - used like a function, as in diffusers and torch
    """Select a backend (or chain) for the calls made inside the block, in this thread only.

    Nestable; the previous selection is restored on exit, also when the block raises. Also a decorator.
    """

    def __init__(self, backend: str) -> None:
        self.chain = resolve(backend)
        self._saved: list[Chain | None] = []

    def __enter__(self) -> attention_backend:
        self._saved.append(_local.context)
        _local.context = self.chain
        return self

    def __exit__(self, *exc: object) -> None:
        _local.context = self._saved.pop()


def set_default_backend(backend: str | None) -> None:
    """Process-wide default selection (``None`` = native). The CLI and ATTNPATCH_BACKEND set it."""
    global _default
    _default = resolve(backend) if backend is not None else resolve("native")


def get_default_backend() -> str:
    return default_chain().spec


def current_backend() -> str:
    """The selection a call made here and now would use (without a per-call ``backend=``)."""
    return (_local.module or _local.context or default_chain()).spec


def set_strict(enabled: bool = True) -> None:
    """Strict mode: raise UnsupportedCall instead of falling back."""
    global _strict
    _strict = bool(enabled)


def set_checks(enabled: bool = True) -> None:
    """Debug checks on every call (device, dtype, shape, masks). Free when off."""
    global _checks
    _checks = bool(enabled)


def set_allow_lossy(enabled: bool = True) -> None:
    """Let `auto` pick lossy backends (int8/fp8 SageAttention)."""
    global _allow_lossy
    _allow_lossy = bool(enabled)
    _reason_cache.clear()


def fallback_counts() -> dict[tuple[str, str, str, str], int]:
    """(requested chain, refusing backend, serving backend, reason) -> calls, since start or the last reset."""
    return dict(_fallbacks)


def reset_fallbacks() -> None:
    _fallbacks.clear()
    _passthroughs.clear()
    _warned.clear()


def note_passthrough(site: str | None, reason: str) -> None:
    """A patcher calls this when it hands a call back to the library's own code (counted for the report)."""
    _passthroughs[(site, reason)] += 1


def passthrough_counts() -> dict[tuple[str | None, str], int]:
    return dict(_passthroughs)


def add_observer(observer: Callable[[CallRecord], None]) -> None:
    if observer not in _observers:
        _observers.append(observer)


def remove_observer(observer: Callable[[CallRecord], None]) -> None:
    if observer in _observers:
        _observers.remove(observer)


def push_module(chain: Chain | None, site: str | None) -> tuple[Chain | None, str | None]:
    """Enter a patched module's scope (per-module selection + report site); returns what to restore."""
    local = _local
    saved = (local.module, local.site)
    local.module = chain
    local.site = site
    return saved


def pop_module(saved: tuple[Chain | None, str | None]) -> None:
    _local.module, _local.site = saved
