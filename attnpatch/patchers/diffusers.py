"""The diffusers patcher: both ways a diffusers processor reaches softmax attention.

1. Dispatcher path (diffusers >= 0.35: Flux, QwenImage, Wan, LTX, HunyuanVideo, ...): processors call
   ``diffusers.models.attention_dispatch.dispatch_attention_fn`` with (batch, seq, heads, head_dim) tensors.
   We replace that function in a post-import hook of its module (the hook runs at the end of the module body,
   before any model module's ``from ..attention_dispatch import dispatch_attention_fn`` completes) and rebind
   by-name copies in modules imported before us.
2. Legacy path (every version; diffusers < 0.35 has only this one): processors such as ``AttnProcessor2_0``
   (SD/SDXL UNets, every VAE mid-block) and ``JointAttnProcessor2_0`` (SD3, AuraFlow, CogVideoX, PixArt, Sana)
   call ``F.scaled_dot_product_attention`` directly, (batch, heads, seq, head_dim). Inside their ``__call__`` only,
   and only on the calling thread, :mod:`attnpatch.patchers.sdpa` redirects that function to the dispatcher.

In both cases the per-module selection comes from the processor call: we wrap the ``__call__`` of each processor
CLASS whose code calls one of the two functions (special methods are looked up on the class, so an instance
attribute would be ignored) and, when the attention module it was called with carries a mark (``MODULE_ATTR``),
routing is process-wide (``state.route_all``) or an ``attention_backend()`` block is open on this thread, push
its selection and name (``patchers/_layers.py``) for the call's duration.
Everything else runs the library's own code untouched. Processors are never replaced (``set_attn_processor``
swaps done by IP-Adapter, LoRA, PAG and fused QKV would undo that); a processor swapped in after ``apply`` is
routed as long as its class qualifies. Processors that need the probabilities (bmm + softmax) and linear
attention call neither function, so they are left alone; their classes get a wrapper that only counts their
calls on routed layers, with the reason and the fix (``SKIPPED``), for the report.

The wrappers are plain functions with ``functools.wraps``: ``Attention.forward`` filters keyword arguments with
``inspect.signature(processor.__call__)``, which follows ``__wrapped__``; and torch.compile traces plain
functions, whereas a wrapt ``FunctionWrapper`` as a class's ``__call__`` makes Dynamo fail its own guard
("Guard failed on the same frame it was created", torch 2.13).
"""

from __future__ import annotations

import functools
import sys
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch

from attnpatch.core import dispatch
from attnpatch.core import selection as selection_module
from attnpatch.core.versions import distribution_version, version_tuple
from attnpatch.patchers import _diffusers_parallel as parallel
from attnpatch.patchers import sdpa, state
from attnpatch.patchers._base import Patcher, code_names
from attnpatch.patchers._layers import mark_of, site_of

DISPATCH_MODULE = "diffusers.models.attention_dispatch"
# Modules that define processor classes and ``set_processor``; hooked so their classes are ready as they load.
PROCESSOR_MODULES = ("diffusers.models.attention_processor", "diffusers.models.attention")
# Versions this patcher was verified on (docs/compat.md); newer ones are patched as far as we recognise them.
OLDEST_SUPPORTED = (0, 30)
NEWEST_TESTED = (0, 42)

# What a processor class's __call__ reaches: the dispatcher function, F.sdpa, or both.
DISPATCHER = "dispatcher"
SDPA = "sdpa"
BOTH = "dispatcher+sdpa"
_TARGETS = {"dispatch_attention_fn": DISPATCHER, "scaled_dot_product_attention": SDPA}
# Passthrough reasons of layers left alone (processors we do not route) start with this: the report lists them
# apart from other passthroughs (attnpatch.report.SKIPPED, the same string).
SKIPPED = "layer left alone: "

_original_dispatch: Callable[..., torch.Tensor] | None = None
_replacement_dispatch: Callable[..., torch.Tensor] | None = None
_kinds: weakref.WeakKeyDictionary[type, str | None] = weakref.WeakKeyDictionary()


def attention_modules(root: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """diffusers attention layers in ``root`` (those with a ``processor``) whose processor class we route."""
    found = []
    for name, module in root.named_modules():
        processor = _processor_of(module)
        if processor is None or processor_kind(type(processor)) is None:
            continue
        if installed():
            _ensure_wrapped(type(processor))
        found.append((name, module))
    return found


def skipped_modules(root: torch.nn.Module) -> list[tuple[str, str]]:
    """(qualified name, processor class) of attention layers in ``root`` whose processor we leave alone."""
    skipped = []
    for name, module in root.named_modules():
        processor = _processor_of(module)
        if processor is not None and processor_kind(type(processor)) is None:
            skipped.append((name, type(processor).__name__))
    return skipped


def unsupported() -> list[str]:
    """Reasons the installed diffusers cannot be fully patched (empty when it is a version we verified)."""
    version = _version()
    if version is None:
        return []
    found = version_tuple(version)[:2]
    reasons = []
    if found < OLDEST_SUPPORTED:
        reasons.append(
            f"diffusers {version} is older than {'.'.join(map(str, OLDEST_SUPPORTED))}, the oldest attnpatch "
            "supports: processors that call F.scaled_dot_product_attention are routed, nothing else is verified"
        )
    if found > NEWEST_TESTED:
        reasons.append(
            f"diffusers {version} is newer than {'.'.join(map(str, NEWEST_TESTED))}, the newest attnpatch was "
            "tested with: processors that call dispatch_attention_fn or F.scaled_dot_product_attention are "
            "routed, any other attention code runs unchanged"
        )
    module = sys.modules.get(DISPATCH_MODULE)
    if module is not None and not callable(module.__dict__.get("dispatch_attention_fn")):
        reasons.append(
            f"diffusers {version}: {DISPATCH_MODULE} has no dispatch_attention_fn, so processors of the "
            "dispatcher kind are not routed"
        )
    return reasons


def processor_kind(cls: type) -> str | None:
    """DISPATCHER, SDPA or BOTH for a processor class we route; None for one we leave alone."""
    try:
        return _kinds[cls]
    except KeyError:
        pass
    owner = _call_owner(cls)
    kind = None
    if owner is not None:
        function = owner.__dict__["__call__"]
        kind = getattr(function, "_attnpatch_kind", None) or _classify(owner, function)
    _kinds[cls] = kind
    return kind


def _call_owner(cls: type) -> type | None:
    # The class in the MRO that defines __call__; torch's own (nn.Module) and builtins never qualify.
    for klass in cls.__mro__:
        if "__call__" in klass.__dict__:
            module = getattr(klass, "__module__", "") or ""
            if klass is object or module == "builtins" or module.startswith("torch."):
                return None
            return klass
    return None


def _classify(owner: type, function: Any) -> str | None:
    if not isinstance(function, types.FunctionType):
        return None
    names = _referenced_names(function, owner, depth=1)
    kinds = {_TARGETS[n] for n in _TARGETS if n in names}
    if len(kinds) == 2:
        return BOTH
    return kinds.pop() if kinds else None


def _referenced_names(function: types.FunctionType, owner: type, depth: int) -> set[str]:
    # Global and attribute names used by the function's code (nested code objects included), plus, one level
    # deep, those of the module-level functions and methods of the class it calls: a processor that hands its
    # q/k/v to a helper which calls the dispatcher is still a dispatcher processor.
    names = set(code_names(function.__code__))
    if depth > 0 and not names & _TARGETS.keys():
        for name in list(names):
            helper = function.__globals__.get(name)
            if helper is None:
                helper = owner.__dict__.get(name)
            if isinstance(helper, types.FunctionType) and helper is not function:
                names |= _referenced_names(helper, owner, depth - 1)
    return names


def _ensure_wrapped(cls: type) -> None:
    kind = processor_kind(cls)
    owner = _call_owner(cls)
    if owner is None or PATCHER.patches.patched(owner, "__call__"):
        return
    skipped = _skip_reason(owner) if kind is None else None
    if kind is None and skipped is None:
        return
    with _lock:
        if not installed() or PATCHER.patches.patched(owner, "__call__"):
            return
        original = owner.__dict__["__call__"]
        if getattr(original, "_attnpatch_kind", None) or getattr(original, "_attnpatch_skipped", None):
            return
        if kind is not None:
            wrapper = sdpa.layer_scope(
                original, layer_arg=True, redirect=kind in (SDPA, BOTH), dispatcher=kind in (DISPATCHER, BOTH)
            )
            wrapper._attnpatch_kind = kind  # type: ignore[attr-defined]
        else:
            wrapper = _wrap_skipped(original, skipped or "")
            wrapper._attnpatch_skipped = skipped  # type: ignore[attr-defined]
        PATCHER.patches.replace(owner, "__call__", wrapper)


_scope = selection_module.scope


def _skip_reason(owner: type) -> str | None:
    """Why the layers of a processor class we do not route are left alone (None: not a processor class)."""
    function = owner.__dict__.get("__call__")
    if not isinstance(function, types.FunctionType):
        return None
    code = function.__code__
    if code.co_argcount < 2 or code.co_varnames[1] != "attn":
        return None  # processors are called as processor(attn, hidden_states, ...)
    names = _referenced_names(function, owner, depth=1)
    if "get_attention_scores" in names or ({"bmm", "baddbmm"} & names and "softmax" in names):
        module = sys.modules.get(owner.__module__)
        routable = f"{owner.__name__}2_0" if hasattr(module, f"{owner.__name__}2_0") else "AttnProcessor2_0"
        return (
            f"{SKIPPED}{owner.__name__} computes the attention probabilities itself (bmm + softmax); "
            f"model.set_attn_processor({routable}()) makes it routable, e.g. "
            f"pipe.unet.set_attn_processor({routable}()) (set_default_attn_processor() installs {owner.__name__})"
        )
    return f"{SKIPPED}{owner.__name__} calls no softmax attention function (linear or custom attention)"


def _wrap_skipped(original: Callable[..., Any], reason: str) -> Callable[..., Any]:
    # A processor class we cannot route: its calls on routed layers are counted with the reason, so the report
    # names the layers that the chosen backend never reached.
    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807 - it becomes the class's __call__
        attn = args[0] if args else kwargs.get("attn")
        if (state.route_all or _scope.context is not None or mark_of(attn) is not None) and (
            not torch.compiler.is_compiling()
        ):
            dispatch.note_passthrough(site_of(attn), reason)
        return original(self, *args, **kwargs)

    return __call__


def _wrap_setter(owner: type) -> None:
    # A processor set after install (a model built later, IP-Adapter, fused QKV) gets its class wrapped here,
    # before its first call.
    original = owner.__dict__["set_processor"]
    if PATCHER.patches.patched(owner, "set_processor") or getattr(original, "_attnpatch_setter", False):
        return

    @functools.wraps(original)
    def set_processor(self: Any, processor: Any, *args: Any, **kwargs: Any) -> Any:
        if installed() and processor is not None:
            _ensure_wrapped(type(processor))
        return original(self, processor, *args, **kwargs)

    set_processor._attnpatch_setter = True  # type: ignore[attr-defined]
    PATCHER.patches.replace(owner, "set_processor", set_processor)


def _sweep_module(module: types.ModuleType) -> None:
    """Wrap the processor classes and set_processor methods defined in ``module``."""
    with _lock:
        if not installed():
            return
        name = module.__name__
        for value in list(vars(module).values()):
            if not isinstance(value, type) or value.__module__ != name:
                continue
            if "__call__" in value.__dict__:
                _ensure_wrapped(value)
            if "set_processor" in value.__dict__:
                _wrap_setter(value)


def _patch_dispatcher(module: types.ModuleType) -> None:
    global _original_dispatch, _replacement_dispatch
    with _lock:
        original = module.__dict__.get("dispatch_attention_fn")
        if not installed() or not callable(original) or getattr(original, "_attnpatch_dispatch", False):
            return
        _original_dispatch = original
        _replacement_dispatch = _wrap_dispatch(original)
        _rebind(original, _replacement_dispatch)


def _rebind(old: Callable[..., Any], new: Callable[..., Any]) -> None:
    # Model modules bind the function by name (`from ..attention_dispatch import dispatch_attention_fn`): every
    # module-level copy must be swapped, not only the defining module's.
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("dispatch_attention_fn") is old:
            namespace["dispatch_attention_fn"] = new


def _wrap_dispatch(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(original)
    def dispatch_attention_fn(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
        *,
        backend: Any = None,
        **options: Any,
    ) -> Any:
        """query: (batch, seq_q, heads, head_dim); key/value: (batch, seq_kv, heads_kv, head_dim).

        Returns out (batch, seq_q, heads, head_dim_v); with attention_kwargs return_lse=True (out, lse (batch,
        seq_q, heads) float32), the layout diffusers' context parallelism uses.
        """
        if state.route_all or _scope.module is not None or _scope.context is not None:
            reason = _dispatch_passthrough_reason(attention_kwargs, backend, options)
            parallel_config = options.get("parallel_config")
            return_lse = bool(attention_kwargs and attention_kwargs.get("return_lse"))
            if reason is None and parallel_config is not None:
                call = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
                reason = parallel.parallel_reason(parallel_config, *call)
                if reason is None:
                    return parallel.parallel_attention(parallel_config, return_lse, *call)
            mask = attn_mask
            if reason is None and attn_mask is not None:
                mask, reason = _dispatch_mask(attn_mask, query, key)
            if reason is None:
                if return_lse:
                    return sdpa.route(query, key, value, mask, dropout_p, is_causal, scale, enable_gqa, return_lse=True)
                return sdpa.route(query, key, value, mask, dropout_p, is_causal, scale, enable_gqa)
            if not torch.compiler.is_compiling():
                dispatch.note_passthrough(selection_module.current_site(), reason)
        return original(
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            enable_gqa,
            attention_kwargs,
            backend=backend,
            **options,
        )

    dispatch_attention_fn._attnpatch_dispatch = True  # type: ignore[attr-defined]
    return dispatch_attention_fn


# attention_kwargs entries that we serve (return_lse: patchers/_diffusers_parallel.py), or that change nothing at
# this value.
_SERVED_KWARGS = {"return_lse"}


def _dispatch_passthrough_reason(
    attention_kwargs: dict[str, Any] | None, backend: Any, options: dict[str, Any]
) -> str | None:
    if backend is not None:
        name = getattr(backend, "value", backend)
        return f"the processor hard-codes diffusers backend {name!r} (diffusers' set_attention_backend)"
    extra = sorted(k for k, v in options.items() if v is not None and k != "parallel_config")
    if extra:
        return f"dispatch_attention_fn called with {', '.join(extra)}"
    if attention_kwargs:
        asked = sorted(k for k in attention_kwargs if k not in _SERVED_KWARGS)
        if asked:
            return f"attention_kwargs {', '.join(asked)} (not served by attnpatch backends)"
    return None


def _dispatch_mask(attn_mask: Any, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    # diffusers' native backend reads a (batch, seq_kv) mask as key padding, like our dispatcher, and passes any
    # other mask to SDPA as it is (so SDPA's right-aligned broadcasting applies).
    if (
        isinstance(attn_mask, torch.Tensor)
        and attn_mask.dim() == 2
        and tuple(attn_mask.shape)
        == (
            query.shape[0],
            key.shape[1],
        )
    ):
        return attn_mask, None
    return sdpa.sdpa_mask(attn_mask, query.shape[0], query.shape[2], query.shape[1], key.shape[1])


def _processor_of(module: torch.nn.Module) -> Any:
    # An nn.Module processor (IP-Adapter) lives in _modules, a plain one in __dict__.
    processor = module.__dict__.get("processor")
    if processor is None:
        processor = module._modules.get("processor")
    return processor


def _version() -> str | None:
    return distribution_version("diffusers")


class DiffusersPatcher(Patcher):
    library = "diffusers"

    def _install(self) -> None:
        # Hook the dispatcher module and the processor modules; wrap what is already imported.
        sdpa.acquire()
        self.when_imported(DISPATCH_MODULE, _patch_dispatcher)
        for name in PROCESSOR_MODULES:
            self.when_imported(name, _sweep_module)
        for name, module in list(sys.modules.items()):
            if name.startswith("diffusers.") and module is not None:
                _sweep_module(module)

    def _uninstall(self) -> None:
        # Restore every function and class attribute we replaced.
        global _original_dispatch, _replacement_dispatch
        if _original_dispatch is not None and _replacement_dispatch is not None:
            _rebind(_replacement_dispatch, _original_dispatch)
        _original_dispatch = _replacement_dispatch = None
        PATCHER.patches.restore()
        sdpa.release()

    attention_modules = staticmethod(attention_modules)

    skipped_modules = staticmethod(skipped_modules)

    unsupported = staticmethod(unsupported)


PATCHER = DiffusersPatcher()
_lock = PATCHER.lock
install = PATCHER.install
uninstall = PATCHER.uninstall
installed = PATCHER.installed
