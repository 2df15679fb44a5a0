"""Which backend a call gets: chains, the scopes that select them, and the process-wide settings.

Selection precedence, most specific wins::

    per-call ``backend=``  >  per-module (apply / set_attention_backend)  >  ``attention_backend()`` context
        >  process default (``set_default_backend`` / ATTNPATCH_BACKEND)  >  ``native``

A selection is a backend name, an alias, ``auto``, or a fallback chain ``"sage,flash,native"``, resolved once
into a :class:`Chain` and cached. Per-module and context selections live in :data:`scope`, a
``threading.local`` whose class has defaults (no per-thread fallback lookups); the settings are module state.
Both are thread-safe and read by torch.compile without graph breaks, unlike ``ContextVar.get``.

Settings (default backend, strict, checks, allow_lossy) come from the ``ATTNPATCH_*`` variables the first time
they are needed, not at import, unless set explicitly before; :func:`snapshot` / :func:`restore` save and put
back all of them (tests, ``install``/``uninstall``). The dispatcher mirrors them through :func:`on_change`.
"""

from __future__ import annotations

import contextvars
import threading
import warnings
from collections.abc import Callable
from contextlib import ContextDecorator
from dataclasses import dataclass
from typing import Any

import torch

from attnpatch import env
from attnpatch.core import forksafe, registry
from attnpatch.core.listeners import Listeners
from attnpatch.core.registry import Backend
from attnpatch.errors import AttnpatchWarning

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


class _Scope(threading.local):
    # Set per thread on its first use: an attribute found in the class on one call and in the thread's own dict
    # on the next would make a compiled frame that read it recompile once (dynamo guards on where it was found:
    # a model compiled before an eager routed call, e.g. a compiled UNet beside an eager VAE).
    context: Chain | None
    module: Chain | None
    site: str | None

    def __init__(self) -> None:
        self.context = self.module = self.site = None


# This thread's context and per-module selection and the calling site. The dispatcher reads it on every call;
# change it only through attention_backend / push_module / pop_module, or as the patchers' layer scope does
# (attnpatch/patchers/sdpa.py: push_module's two writes inline, restored in a finally, on every routed layer call).
scope = _Scope()

_lock = forksafe.Lock(reentrant=True)
_chains: dict[str, Chain] = {}
_changed = Listeners()  # told after a setting or the registry changed
_contexts_changed = Listeners()  # told after an attention_backend block opened or closed in eager code

# The settings. None until loaded: _load() reads the environment for those not set explicitly.
_default: Chain | None = None
_default_spec: str | None = None  # what the user asked for (None = the environment, then native)
_strict: bool | None = None
_checks: bool | None = None
_allow_lossy: bool | None = None


def on_change(listener: Callable[[], None], *, contexts: Callable[[], None] | None = None) -> None:
    """Call ``listener`` after any setting or the registry changed (the dispatcher refreshes its mirrors), and
    ``contexts`` (default: ``listener``) after an attention_backend block opened or closed in eager code: that
    changes which chain a call gets, never what a chain decides, so a listener may keep what it decided."""
    _changed.add(listener)
    _contexts_changed.add(contexts or listener)


def _registry_changed() -> None:
    global _default, _default_spec
    with _lock:
        _chains.clear()
        if _default is not None:
            try:
                _default = resolve(_default.spec)
            except registry.UnknownBackendError:
                # The default named a backend that was just unregistered: every later call would raise. Back to
                # native, said once.
                warnings.warn(
                    f"attnpatch: the default backend {_default.spec!r} is no longer registered; the default is "
                    "'native' again (set another with attnpatch.set_default_backend)",
                    AttnpatchWarning,
                    stacklevel=4,
                )
                _default, _default_spec = resolve("native"), None
    _changed()


registry.on_change(_registry_changed)


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
    # The fast path calls the first backend with no per-call check and no fallback: only for built-ins that serve
    # every call (native, _native_math), whose failure no later backend would mend. Others take the slow path,
    # where a kernel that raises falls back to the next backend.
    fast = first if isinstance(first, Backend) and first.serves_every_call and first.builtin else None
    chain = Chain(
        spec=",".join(m if isinstance(m, str) else m.name for m in members),
        members=tuple(members),
        implicit_native=implicit,
        fast=fast,
    )
    _chains[selection] = chain
    return chain


def native_chain(spec: str) -> Chain:
    """A chain that runs ``native`` whatever it is called: ``spec`` is kept so the report shows what was asked."""
    native = registry.get_backend("native")
    return Chain(spec=spec, members=(native,), implicit_native=False, fast=native)


def _load() -> None:
    # The environment, for every setting not set explicitly; resolving the default imports the backends.
    global _default, _strict, _checks, _allow_lossy
    with _lock:
        if _strict is None:
            _strict = env.strict()
        if _checks is None:
            _checks = env.checks()
        if _allow_lossy is None:
            _allow_lossy = env.allow_lossy()
        if _default is None:
            _default = resolve(_default_spec or "native")
    _changed()


def default_chain() -> Chain:
    """The process default as a chain (loads the settings on first use)."""
    if _default is None:
        _load()
    assert _default is not None
    return _default


def loaded_default() -> Chain | None:
    """The default chain if the settings are loaded, else None (the dispatcher's fast path reads this)."""
    return _default


def set_default_backend(backend: str | None) -> None:
    """Process-wide default selection (``None`` = native). The CLI and ATTNPATCH_BACKEND set it."""
    global _default, _default_spec
    chain = resolve(backend if backend is not None else "native")
    with _lock:
        _default_spec = chain.spec
        _default = chain
    _changed()


def get_default_backend() -> str:
    return default_chain().spec


def current_backend() -> str:
    """The selection a call made here and now would use (without a per-call ``backend=``)."""
    return (scope.module or context_chain() or default_chain()).spec


def strict() -> bool:
    """Strict mode: raise UnsupportedCall instead of falling back."""
    if _strict is None:
        _load()
    return bool(_strict)


def checks() -> bool:
    """Debug checks on every call."""
    if _checks is None:
        _load()
    return bool(_checks)


def allow_lossy() -> bool:
    """Whether `auto` may pick lossy backends."""
    if _allow_lossy is None:
        _load()
    return bool(_allow_lossy)


def set_strict(enabled: bool = True) -> None:
    """Strict mode: raise UnsupportedCall instead of falling back."""
    global _strict
    _strict = bool(enabled)
    _changed()


def set_checks(enabled: bool = True) -> None:
    """Debug checks on every call (device, dtype, shape, masks). Free when off."""
    global _checks
    _checks = bool(enabled)
    _changed()


def set_allow_lossy(enabled: bool = True) -> None:
    """Let `auto` pick lossy backends (int8/fp8 SageAttention)."""
    global _allow_lossy
    _allow_lossy = bool(enabled)
    _changed()


def snapshot() -> dict[str, Any]:
    """Every setting as it is now (unloaded ones stay unloaded on :func:`restore`)."""
    return {
        "default": _default,
        "default_spec": _default_spec,
        "strict": _strict,
        "checks": _checks,
        "allow_lossy": _allow_lossy,
    }


def restore(saved: dict[str, Any]) -> None:
    """Put back what :func:`snapshot` returned, and clear this thread's scopes."""
    global _default, _default_spec, _strict, _checks, _allow_lossy
    with _lock:
        _default, _default_spec = saved["default"], saved["default_spec"]
        _strict, _checks, _allow_lossy = saved["strict"], saved["checks"], saved["allow_lossy"]
    scope.context = scope.module = None
    scope.site = None
    _changed()


class attention_backend(ContextDecorator):  # noqa: N801 - used like a function, as in diffusers and torch
    """Select a backend (or chain) for the calls made inside the block, in this thread or asyncio task only.

    Nestable; the previous selection is restored on exit, also when the block raises. Also a decorator.

    The selection is a ``contextvars.ContextVar``, so interleaved asyncio tasks each see their own and nothing
    stays set after a block ends. Compiled regions cannot read a ContextVar without a graph break, so they read a
    thread-local mirror of it, set on entering and leaving a block: there, two tasks interleaving on one thread
    inside compiled code see the selection of the one that entered or left last.
    """

    def __init__(self, backend: str) -> None:
        self.chain = resolve(backend)
        self._saved: list[tuple[contextvars.Token[Chain | None] | None, Chain | None]] = []

    def __enter__(self) -> attention_backend:
        global _contexts
        if torch.compiler.is_compiling():  # entered inside a compiled region: the thread-local only
            self._saved.append((None, scope.context))
            scope.context = self.chain
            return self
        self._saved.append((_context.set(self.chain), scope.context))
        scope.context = self.chain
        with _lock:
            _contexts += 1
        _contexts_changed()
        return self

    def __exit__(self, *exc: object) -> None:
        global _contexts
        token, previous = self._saved.pop()
        if token is None:
            scope.context = previous
            return
        _context.reset(token)
        scope.context = _context.get()
        with _lock:
            _contexts -= 1
        _contexts_changed()


# The context selection (see attention_backend) and how many blocks are open in the process: with none open, the
# dispatcher reads nothing (the common case costs one global read per call).
_context: contextvars.ContextVar[Chain | None] = contextvars.ContextVar("attnpatch_context", default=None)
_contexts = 0


def open_contexts() -> int:
    """How many attention_backend blocks are open in this process (all threads and tasks)."""
    return _contexts


def context_chain() -> Chain | None:
    """The selection of the innermost attention_backend block of this task (thread-local in compiled code)."""
    if torch.compiler.is_dynamo_compiling():  # (dynamo breaks the graph on ContextVar.get; one call, not two)
        return scope.context
    return _context.get()


def push_module(chain: Chain | None, site: str | None) -> tuple[Chain | None, str | None]:
    """Enter a patched module's scope (per-module selection + report site); returns what to restore."""
    local = scope
    saved = (local.module, local.site)
    local.module = chain
    local.site = site
    return saved


def pop_module(saved: tuple[Chain | None, str | None]) -> None:
    scope.module, scope.site = saved


def current_site() -> str | None:
    """The qualified name of the patched module whose call is running on this thread, if any."""
    return scope.site


def module_selection() -> Chain | None:
    """The per-module selection of the patched module running on this thread, if any."""
    return scope.module
