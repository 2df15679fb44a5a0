"""The backend registry: every backend by name, its aliases, and whether it can run in this process.

A backend is a function in the calling convention of :mod:`attnpatch.core.call` plus a :class:`Capabilities`
declaration. The dispatcher asks :meth:`Backend.call_reasons` before routing a call; an empty list means the
backend can serve it. Built-in backends live one family per file in ``attnpatch/backends/`` and register
themselves when that package is loaded: :func:`load_builtins` imports it by name on first use (the one place
core reaches the backends layer, as a plugin load, so that ``import attnpatch`` stays cheap).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from attnpatch.core import forksafe
from attnpatch.core.call import BackendFn, CallSpec, ExtraFn
from attnpatch.core.capabilities import ACCEPT_ALL, Capabilities, capability_reasons
from attnpatch.core.listeners import Listeners
from attnpatch.errors import UnknownBackendError, shown

BUILTINS_PACKAGE = "attnpatch.backends"


@dataclass(eq=False)
class Backend:
    """A registered backend. ``available``/``reasons`` describe this process; ``call_reasons`` one call."""

    name: str
    fn: BackendFn
    family: str = "user"
    caps: Capabilities = ACCEPT_ALL
    requires: Callable[[], list[str]] | None = None
    check: Callable[[CallSpec], list[str]] | None = None
    description: str = ""
    builtin: bool = False
    # The same function for (batch, heads, seq, head_dim) tensors (SDPA's layout), or None: callers holding that
    # layout (the patchers) skip two transposes each way on the fast path (dispatch.route_bhsd).
    fn_bhsd: BackendFn | None = field(default=None, repr=False)
    # True when the backend is torch's SDPA itself (``native``): a call that SDPA accepts, made in SDPA's own terms,
    # gives through it exactly what SDPA gives, so a patcher may let such a call run as the caller wrote it.
    is_sdpa: bool = field(default=False, repr=False)
    # The function for calls with later arguments (softcap, window, sinks, return_lse: as keywords, see
    # attnpatch.core.call); None: ``fn``. A built-in may keep ``fn`` lean for the plain calls of the fast path.
    extra_fn: ExtraFn = field(default=None, repr=False)  # type: ignore[assignment]
    _reasons: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.extra_fn is None:
            self.extra_fn = self.fn

    @property
    def reasons(self) -> list[str]:
        """Why this backend cannot run in this process at all (package, version, device); cached."""
        if self._reasons is None:
            try:
                self._reasons = list(self.requires()) if self.requires is not None else []
            except Exception as exc:  # a broken optional package must not break listing or dispatch
                self._reasons = [f"availability check failed: {type(exc).__name__}: {exc}"]
        return self._reasons

    @property
    def available(self) -> bool:
        return not self.reasons

    @property
    def serves_every_call(self) -> bool:
        """True when routing needs no per-call check (the dispatcher's fast path)."""
        return self.check is None and self.caps.accepts_everything() and self.available

    def forget_availability(self) -> None:
        """Drop the cached :attr:`reasons` (see :func:`refresh`)."""
        self._reasons = None

    def call_reasons(self, call: CallSpec) -> list[str]:
        reasons = list(self.reasons)
        if reasons:
            return reasons
        reasons = capability_reasons(self.caps, call)
        if self.check is not None:
            reasons.extend(self.check(call))
        return reasons


_lock = forksafe.Lock(reentrant=True)
_backends: dict[str, Backend] = {}
_aliases: dict[str, str] = {}
_builtins_loaded = False


def load_builtins() -> None:
    """Import every public module of attnpatch.backends: each registers its own family, so adding a backend
    never touches a central list. Idempotent."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _lock:
        if _builtins_loaded:
            return
        package = importlib.import_module(BUILTINS_PACKAGE)

        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package.__name__}.{info.name}")
        _builtins_loaded = True


def register(backend: Backend, *, replace: bool = False, aliases: Iterable[str] = ()) -> Backend:
    """Register ``backend`` (internal form used by the built-in backend files)."""
    with _lock:
        existing = _backends.get(backend.name)
        if existing is not None and not replace:
            kind = "built-in" if existing.builtin else "registered"
            raise ValueError(
                f"backend {backend.name!r} is already {kind}; pass replace=True to re-register it, "
                "or choose another name"
            )
        if backend.name in _aliases and not replace:
            raise ValueError(
                f"{backend.name!r} is an alias of {_aliases[backend.name]!r}; pass replace=True or choose another name"
            )
        _aliases.pop(backend.name, None)
        _backends[backend.name] = backend
        for alias in aliases:
            _aliases[alias] = backend.name
        _changed()
    return backend


def register_backend(
    name: str,
    fn: BackendFn,
    *,
    replace: bool = False,
    family: str = "user",
    description: str = "",
    **capabilities: Any,
) -> Backend:
    """Register a backend of your own under ``name``.

    ``fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> out`` takes the dispatcher's
    arguments in its layout: query (batch, seq_q, heads, head_dim), key/value (batch, seq_kv, heads_kv, head_dim),
    returns (batch, seq_q, heads, head_dim_v); see attnpatch/core/call.py for the mask. ``capabilities`` are fields
    of :class:`Capabilities` (``devices={"cuda"}``, ``dtypes={torch.float16}``, ``max_head_dim=128``, ``masks=
    {"none"}``, ``gqa=False``, ...); with none given the backend is taken to accept every call without the later
    arguments. Declare ``softcap=True``, ``window=True``, ``sinks=True`` or ``return_lse=True`` to receive them
    as keywords (only when a call has them; with return_lse, return ``(out, lse)``). Re-registering an existing
    name needs ``replace=True``.
    """
    if not isinstance(name, str) or not name.strip() or "," in name or name.strip().lower() == "auto":
        raise ValueError(
            f"register_backend(name={name!r}): the name must be a non-empty string without commas, not 'auto' "
            "(commas separate the backends of a chain)"
        )
    if not callable(fn):
        raise TypeError(f"register_backend({name!r}, fn): fn must be callable, got {type(fn).__name__}")
    load_builtins()
    fields = Capabilities.__dataclass_fields__
    unknown = sorted(set(capabilities) - set(fields))
    if unknown:
        raise TypeError(
            f"register_backend({name!r}): unknown capabilities {unknown}; valid ones: {', '.join(sorted(fields))}"
        )
    for key, kind, example in (
        ("devices", str, "devices={'cuda'}"),
        ("dtypes", torch.dtype, "dtypes={torch.float16}"),
        ("masks", str, "masks={'none', 'key_padding'}"),
    ):
        value = capabilities.get(key)
        if value is None:
            continue
        if isinstance(value, str | torch.dtype) or not all(isinstance(item, kind) for item in value):
            raise TypeError(
                f"register_backend({name!r}, {key}={value!r}): {key} must be a set of {kind.__name__} values, "
                f"e.g. {example}"
            )
        capabilities[key] = frozenset(value)
    caps = Capabilities(**capabilities)
    return register(Backend(name=name, fn=fn, family=family, caps=caps, description=description), replace=replace)


def unregister_backend(name: str) -> None:
    """Remove a backend registered with :func:`register_backend` (built-ins cannot be removed)."""
    with _lock:
        backend = _backends.get(name)
        if backend is None:
            raise UnknownBackendError(unknown_message(name))
        if backend.builtin:
            raise ValueError(f"backend {name!r} is built in and cannot be unregistered; replace it instead")
        del _backends[name]
        _changed()


def alias(name: str, target: str) -> None:
    with _lock:
        _aliases[name] = target
        _changed()


_changed = Listeners()


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener`` whenever the registry changes (the dispatcher clears its caches)."""
    _changed.add(listener)


def refresh() -> None:
    """Forget every backend's cached availability and tell the listeners (the dispatcher drops its caches).

    For changes the registry cannot see: a package installed or replaced at run time, Hub trust switched,
    a device emulated (:func:`attnpatch.testing.emulate_device`).
    """
    with _lock:
        for backend in _backends.values():
            backend.forget_availability()
        _changed()


def canonical(name: str) -> str:
    """The registered name for ``name`` or one of its aliases (case-insensitive, '-' == '_')."""
    load_builtins()
    if name in _backends:
        return name
    key = name.strip().lower().replace("-", "_")
    if key in _backends:
        return key
    if key in _aliases:
        return _aliases[key]
    raise UnknownBackendError(unknown_message(name))


def unknown_message(name: str) -> str:
    choices = sorted(set(_backends) | set(_aliases) | {"auto"})
    # A pasted file or a runaway variable: say how long, not all of it, and spare difflib the comparison.
    close = [] if len(name) > 80 else difflib.get_close_matches(name.strip().lower(), choices, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return (
        f"unknown attention backend {shown(name, limit=80)}: {hint}valid names: {', '.join(choices)} "
        "(run `python -m attnpatch list` to see which are available here)"
    )


def get_backend(name: str) -> Backend:
    """The :class:`Backend` registered under ``name`` (or an alias of it)."""
    return _backends[canonical(name)]


def list_backends() -> list[Backend]:
    """Every registered backend, built-ins first in family order; each has ``name``, ``available``, ``reasons``."""
    load_builtins()
    with _lock:
        return sorted(_backends.values(), key=lambda b: (not b.builtin, b.family, b.name))


def aliases() -> dict[str, str]:
    load_builtins()
    return dict(_aliases)
