"""The backend registry: what each backend can serve, and why it refuses a call.

A backend is a function with the dispatcher's signature and layout::

    fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> out
    query: (batch, seq_q, heads_q, head_dim)      key: (batch, seq_kv, heads_kv, head_dim)
    value: (batch, seq_kv, heads_kv, head_dim_v)  out: (batch, seq_q, heads_q, head_dim_v)
    attn_mask: None, or the normalised mask (batch|1, 1|heads_q, seq_q|1, seq_kv), bool (True = attend)
               or additive float in query's dtype. heads_kv may divide heads_q (GQA) whatever enable_gqa says.
    is_causal: top-left aligned, as in torch's scaled_dot_product_attention. Never set together with a mask:
               the dispatcher folds causality into the mask first.

plus a :class:`Capabilities` declaration. The dispatcher asks :meth:`Backend.call_reasons` before routing a call;
an empty list means the backend can serve it. Built-in backends live one family per file in
``attnpatch/backends/`` and register themselves when that package is imported (lazily, on first use).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import pkgutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from attnpatch.errors import UnknownBackendError

BackendFn = Callable[..., torch.Tensor]

# Mask kinds after normalisation. "key_padding" is a bool mask of shape (B, 1, 1, Skv): every backend that
# takes bool masks takes it, and varlen kernels can take only it.
MASK_NONE = "none"
MASK_KEY_PADDING = "key_padding"
MASK_BOOL = "bool"
MASK_ADDITIVE = "additive"
ALL_MASKS = frozenset({MASK_NONE, MASK_KEY_PADDING, MASK_BOOL, MASK_ADDITIVE})

_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}

# Default tolerances against a float64 reference, by input dtype (atol, rtol). Backends that are lossy or
# accumulate differently declare their own.
DEFAULT_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


@dataclass(frozen=True)
class Capabilities:
    """What a backend can serve. ``None`` for devices/dtypes/head dims means 'any'.

    devices: device types ("cpu", "cuda", "xla", "npu", "mps").
    min_compute_capability: for CUDA, the lowest (major, minor) the kernel runs on.
    max_compute_capability: for CUDA, the highest major.minor the kernel runs on (None = no limit).
    head_dim_multiple: the head dim must be a multiple of this (8 for most fused kernels).
    masks: which normalised mask kinds are accepted (see MASK_*).
    causal_cross: causal with seq_q != seq_kv is served top-left aligned like SDPA. Kernels that align the
        causal mask bottom-right (flash-attn) must say False here, or their answer differs silently.
    gqa: key/value may have fewer heads than query.
    scale: a custom softmax scale is honoured (not silently replaced by 1/sqrt(head_dim)).
    lossy: quantises inputs (int8/fp8); `auto` skips it unless lossy backends are allowed.
    compile_safe: runs under torch.compile(fullgraph=True) without a graph break.
    priority: order for `auto` (higher is tried first) among backends that can serve a call; an int, or a
        mapping device type -> int for kernels whose rank differs by device (missing device = 0 = never auto).
    """

    devices: frozenset[str] | None = None
    dtypes: frozenset[torch.dtype] | None = None
    min_head_dim: int = 1
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    same_v_head_dim: bool = False
    masks: frozenset[str] = ALL_MASKS
    causal: bool = True
    causal_cross: bool = True
    cross: bool = True
    gqa: bool = True
    dropout: bool = True
    scale: bool = True
    backward: bool = True
    compile_safe: bool = True
    deterministic: bool = True
    lossy: bool = False
    min_compute_capability: tuple[int, int] | None = None
    max_compute_capability: tuple[int, int] | None = None
    priority: int | dict[str, int] = 0
    tolerance: dict[torch.dtype, tuple[float, float]] = field(default_factory=dict)

    def priority_for(self, device_type: str) -> int:
        if isinstance(self.priority, dict):
            return self.priority.get(device_type, 0)
        return self.priority

    def tolerance_for(self, dtype: torch.dtype) -> tuple[float, float]:
        return self.tolerance.get(dtype) or DEFAULT_TOLERANCE.get(dtype, (3e-2, 3e-2))

    def accepts_everything(self) -> bool:
        """No restriction at all (priority and tolerances do not restrict what can be served)."""
        return dataclasses.replace(self, priority=0, tolerance={}, deterministic=True) == ACCEPT_ALL


ACCEPT_ALL = Capabilities()


@dataclass(frozen=True)
class CallSpec:
    """The facts about one call that decide whether a backend can serve it (hashable: it keys caches)."""

    device_type: str
    device_index: int | None
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    mask_kind: str
    is_causal: bool
    dropout: bool
    custom_scale: bool
    needs_grad: bool
    compiling: bool

    @staticmethod
    def of(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask_kind: str,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
    ) -> CallSpec:
        device = query.device
        return CallSpec(
            device_type=device.type,
            device_index=device.index,
            dtype=query.dtype,
            head_dim=query.shape[-1],
            head_dim_v=value.shape[-1],
            heads_q=query.shape[2],
            heads_kv=key.shape[2],
            seq_q=query.shape[1],
            seq_kv=key.shape[1],
            mask_kind=mask_kind,
            is_causal=is_causal,
            dropout=dropout_p > 0.0,
            custom_scale=scale is not None,
            needs_grad=torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad),
            compiling=torch.compiler.is_compiling(),
        )


def capability_reasons(caps: Capabilities, call: CallSpec) -> list[str]:
    """Every reason ``caps`` cannot serve ``call``, each a sentence a user can act on. Empty = can serve."""
    reasons: list[str] = []
    if caps.devices is not None and call.device_type not in caps.devices:
        reasons.append(f"runs on {'/'.join(sorted(caps.devices))}, got tensors on {call.device_type}")
    elif call.device_type == "cuda" and (caps.min_compute_capability or caps.max_compute_capability):
        cc = _compute_capability(call.device_index)
        low, high = caps.min_compute_capability, caps.max_compute_capability
        if low and cc < low:
            reasons.append(f"needs compute capability >= {low[0]}.{low[1]}, found {cc[0]}.{cc[1]}")
        if high and cc > high:
            reasons.append(f"runs on compute capability <= {high[0]}.{high[1]}, found {cc[0]}.{cc[1]}")
    if caps.dtypes is not None and call.dtype not in caps.dtypes:
        names = ", ".join(sorted(dtype_name(d) for d in caps.dtypes))
        reasons.append(f"needs dtype {names}, got {dtype_name(call.dtype)} (cast the model, or use native)")
    if call.head_dim < caps.min_head_dim:
        reasons.append(f"head_dim {call.head_dim} < {caps.min_head_dim}")
    if caps.max_head_dim is not None and max(call.head_dim, call.head_dim_v) > caps.max_head_dim:
        reasons.append(f"head_dim {max(call.head_dim, call.head_dim_v)} > {caps.max_head_dim}")
    if caps.head_dim_multiple > 1 and call.head_dim % caps.head_dim_multiple:
        reasons.append(f"head_dim {call.head_dim} is not a multiple of {caps.head_dim_multiple}")
    if caps.same_v_head_dim and call.head_dim_v != call.head_dim:
        reasons.append(f"value head_dim {call.head_dim_v} != query head_dim {call.head_dim}")
    if call.mask_kind not in caps.masks:
        served = sorted(caps.masks - {MASK_NONE}) or ["none"]
        reasons.append(f"does not take a {call.mask_kind.replace('_', '-')} attn_mask (takes: {', '.join(served)})")
    if call.is_causal and not caps.causal:
        reasons.append("has no causal mode")
    if call.seq_q != call.seq_kv:
        if not caps.cross:
            reasons.append(f"needs seq_q == seq_kv, got {call.seq_q} != {call.seq_kv}")
        elif call.is_causal and not caps.causal_cross:
            reasons.append(
                f"aligns causal masks bottom-right, SDPA top-left: they differ when seq_q {call.seq_q} != "
                f"seq_kv {call.seq_kv}"
            )
    if call.heads_kv != call.heads_q and not caps.gqa:
        reasons.append(f"no GQA/MQA ({call.heads_q} query heads, {call.heads_kv} key/value heads)")
    if call.dropout and not caps.dropout:
        reasons.append("no dropout (dropout_p > 0)")
    if call.custom_scale and not caps.scale:
        reasons.append("ignores a custom softmax scale")
    if call.needs_grad and not caps.backward:
        reasons.append("has no backward pass (inputs require grad)")
    if call.compiling and not caps.compile_safe:
        reasons.append("is not torch.compile-safe")
    return reasons


@functools.cache
def _compute_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


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
    _reasons: list[str] | None = field(default=None, repr=False)

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

    def call_reasons(self, call: CallSpec) -> list[str]:
        reasons = list(self.reasons)
        if reasons:
            return reasons
        reasons = capability_reasons(self.caps, call)
        if self.check is not None:
            reasons.extend(self.check(call))
        return reasons


_lock = threading.RLock()
_backends: dict[str, Backend] = {}
_aliases: dict[str, str] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    # Import every module of attnpatch.backends: each registers its own family, so adding a backend never
    # touches a central list.
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _lock:
        if _builtins_loaded:
            return
        import attnpatch.backends as package

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
    returns (batch, seq_q, heads, head_dim_v); see the module docstring for the mask. ``capabilities`` are fields
    of :class:`Capabilities` (``devices={"cuda"}``, ``dtypes={torch.float16}``, ``max_head_dim=128``, ``masks=
    {"none"}``, ``gqa=False``, ...); with none given the backend is taken to accept every call. Re-registering
    an existing name needs ``replace=True``.
    """
    if not callable(fn):
        raise TypeError(f"register_backend({name!r}, fn): fn must be callable, got {type(fn).__name__}")
    _load_builtins()
    fields = Capabilities.__dataclass_fields__
    unknown = sorted(set(capabilities) - set(fields))
    if unknown:
        raise TypeError(
            f"register_backend({name!r}): unknown capabilities {unknown}; valid ones: {', '.join(sorted(fields))}"
        )
    for key in ("devices", "dtypes", "masks"):
        if capabilities.get(key) is not None:
            capabilities[key] = frozenset(capabilities[key])
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


_listeners: list[Callable[[], None]] = []


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener`` whenever the registry changes (the dispatcher clears its caches)."""
    _listeners.append(listener)


def _changed() -> None:
    for listener in _listeners:
        listener()


def canonical(name: str) -> str:
    """The registered name for ``name`` or one of its aliases (case-insensitive, '-' == '_')."""
    _load_builtins()
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
    close = difflib.get_close_matches(name.strip().lower(), choices, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return (
        f"unknown attention backend {name!r}: {hint}valid names: {', '.join(choices)} "
        "(run `python -m attnpatch list` to see which are available here)"
    )


def get_backend(name: str) -> Backend:
    """The :class:`Backend` registered under ``name`` (or an alias of it)."""
    return _backends[canonical(name)]


def list_backends() -> list[Backend]:
    """Every registered backend, built-ins first in family order; each has ``name``, ``available``, ``reasons``."""
    _load_builtins()
    with _lock:
        return sorted(_backends.values(), key=lambda b: (not b.builtin, b.family, b.name))


def aliases() -> dict[str, str]:
    _load_builtins()
    return dict(_aliases)


def package_reasons(module: str, pip_name: str, min_version: str | None = None, extra: str = "") -> list[str]:
    """Reasons a kernel package is unusable: not installed, or older than ``min_version``. Imports nothing."""
    import importlib.metadata
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return [f"{module} not installed: pip install {pip_name}{extra}"]
    if min_version is None:
        return []
    try:
        version = importlib.metadata.version(pip_name.split("[")[0].split("=")[0].split(">")[0])
    except importlib.metadata.PackageNotFoundError:
        return []
    if _version_tuple(version) < _version_tuple(min_version):
        return [f"{module} version {version} < {min_version}: pip install -U '{pip_name}>={min_version}'{extra}"]
    return []


def cuda_reasons() -> list[str]:
    if not torch.cuda.is_available():
        return ["needs a CUDA GPU: torch.cuda.is_available() is False"]
    return []


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)
