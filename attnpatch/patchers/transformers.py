"""Route the attention of transformers models into the attnpatch dispatcher.

Where transformers looks up its attention function, by version:

- 5.1+: each layer asks ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_fn)`` on each
  call; the wrapped ``get_interface`` hands back a router around the function it would have returned. The name
  is kept, so transformers still builds that implementation's masks (a new name silently drops them).
- 4.48-5.0: layers read ``ALL_ATTENTION_FUNCTIONS[name]`` or, for ``eager``, the global ``eager_attention_forward``
  of their own modeling module at call time. We replace the ``sdpa`` entry and each ``eager_attention_forward``.
- 4.46-4.47, and layers of any version that call ``F.scaled_dot_product_attention`` themselves (falcon, sam,
  aimv2, the ``*SdpaAttention`` classes of 4.4x): each such method is wrapped in a scope of the SDPA redirect
  (:mod:`attnpatch.patchers.sdpa`), which sends the SDPA calls made inside it to the dispatcher.
- Eager layers before 4.48 (and T5-family layers before 5.15) compute attention inline: not routed.

Modeling modules are patched by post-import hooks registered at install. The function contract (all versions)::

    fn(module, query, key, value, attention_mask, *, dropout, scaling, is_causal=None, **kwargs)
        query: (batch, heads, seq_q, head_dim); key/value: (batch, heads_kv, seq_kv, head_dim), not repeated
        -> (out (batch, seq_q, heads, head_dim_v), attention weights or None)

A router sends a call to the dispatcher only when the layer (``module``) carries a selection (``MODULE_ATTR``)
or routing is process-wide (``state.route_all``); otherwise it calls the original function with the very same
arguments. Routed: the sdpa function, plain eager functions (with ``softcap`` where they apply it), gpt-oss's
eager function with its sinks, and the flash and flex functions under any implementation name (flash_attention_*,
Hub flash kernels, flex_attention; their mask forms in :mod:`._transformers_forms`). A call with something no
backend can honour goes to the original function, counted with its reason (``dispatch.note_passthrough``):
varlen ``cu_seq_lens`` outside flash, a paged cache, ``head_mask``, extra positional arguments, a mask that is not
a tensor, attention weights asked for, and functions we do not know (custom and non-flash Hub kernels). A T5-style
``position_bias`` is folded into an additive mask, as transformers' own sdpa and eager functions do.

An eager layer is routed only while nobody asked for its attention weights (``output_attentions``, as an argument,
in the config, or by an output collector); it then returns ``None`` for them, as ``sdpa`` does.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

from attnpatch.core import dispatch
from attnpatch.core import selection as selection_module
from attnpatch.core.selection import Chain
from attnpatch.core.versions import distribution_version, version_tuple
from attnpatch.patchers import MODULE_ATTR, SITE_ATTR, sdpa, state
from attnpatch.patchers import _transformers_calls as calls
from attnpatch.patchers import _transformers_forms as forms
from attnpatch.patchers._base import Patcher, code_names
from attnpatch.patchers._layers import route_of, routes, site_of

AttentionFn = Callable[..., tuple[torch.Tensor, Any]]

# The oldest transformers with an attention-function mapping (ALL_ATTENTION_FUNCTIONS) and the oldest we patch.
MAPPING_VERSION = (4, 48)
OLDEST_VERSION = (4, 46)
# The newest release CI runs the patcher tests on (the test extra pins it; .ci/old-versions.txt has the oldest).
NEWEST_TESTED = (5, 25)
# transformers < 4.53 makes an SDPA call causal when no mask is given, whatever the layer's `is_causal` says;
# later versions ask the layer (`getattr(module, "is_causal", True)`).
_LAYER_DECIDES_CAUSAL_VERSION = (4, 53)

# (original function, implementation name) -> router; the same router every time keeps function identity stable
# (torch.compile guards on it, and `get_interface(...) is get_interface(...)` stays true).
_routers: dict[tuple[Any, str], AttentionFn] = {}
_ROUTER_ATTR = "__attnpatch_original__"


def transformers_version() -> tuple[int, ...] | None:
    """The installed transformers version as a tuple, without importing it; None when not installed."""
    version = distribution_version("transformers")
    if version is None:
        return None
    return version_tuple(version)


# --------------------------------------------------------------------------------------------------- routing


def _route(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
    chain: Chain,
    site: str | None,
    eager: bool,
    position_bias: torch.Tensor | None,
    extra: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    """Run one call on the dispatcher with the semantics of transformers' sdpa (or eager) function.

    query (B, H, Sq, D), key/value (B, Hkv, Skv, D) -> (out (B, Sq, H, Dv) contiguous, None).
    position_bias: an additive term on the scores (T5 relative positions), (B|1, H, Sq, Skv), or None.
    extra: the dispatcher's later arguments this function applies (softcap, sinks), or empty.
    """
    dropout = kwargs.get("dropout", 0.0)
    scaling = kwargs.get("scaling")
    query_shape, key_shape = query.shape, key.shape  # read once: each read of a tensor's shape costs ~0.1 us
    q_len, kv_len = query_shape[2], key_shape[2]
    mask = attention_mask
    if mask is not None and mask.shape[-1] > kv_len:
        mask = mask[..., :kv_len]  # static caches hand over a mask as long as the whole cache
    if eager:
        # Eager code applies no causal flag (the mask carries causality) and drops out only in training.
        causal = False
        if not getattr(module, "training", False):
            dropout = 0.0
    else:
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True) if _layer_decides_causal else True
        # As in sdpa_attention_forward: the kernel flag only for a causal layer, with no mask, past decoding.
        causal = q_len > 1 and mask is None and is_causal
        if causal and kv_len > q_len:
            # A prefill into an empty static cache: the keys past q_len are never attended (top-left causal);
            # cropping them gives the square call that flash kernels take, as transformers does.
            key = key[:, :, :q_len]
            value = value[:, :, :q_len]
            kv_len = q_len
    if position_bias is not None:
        # Folded into an additive mask, as each original does: eager adds it to the scores, sdpa (5.15+) builds
        # the mask with create_position_bias_mask (and so do we, with its own function).
        if causal and position_bias.shape[-1] > kv_len:
            position_bias = position_bias[..., :kv_len]
        if eager:
            mask = position_bias if mask is None else position_bias + mask
        else:
            mask = _create_position_bias_mask(position_bias, mask, causal, query, key)
            causal = False
    packed = 0
    gqa = key_shape[1] != query_shape[1]
    if gqa and not eager:
        query, key, value, mask, packed = calls.gqa_as_transformers(chain, query, key, value, mask, query_shape)
        gqa = key.shape[1] != query_shape[1] if not packed else False
    # In the layout transformers holds (batch, heads, seq, head_dim): native takes it as it is. Straight to the
    # dispatcher unless a redirect scope is open on this thread (a layer that also calls F.sdpa itself).
    causal = bool(causal)
    if extra or sdpa.redirecting():
        out = sdpa.route_bhsd(query, key, value, mask, dropout, causal, scaling, gqa, module_chain=chain, site=site,
                              **extra)  # fmt: skip
    else:
        out = dispatch.route_bhsd(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                  scale=scaling, enable_gqa=gqa, module_chain=chain, site=site)  # fmt: skip
    if packed:  # (B, Hkv, n_rep, Dv) of one query token -> (B, H, 1, Dv), as sdpa_attention_forward reshapes it
        out = out.reshape(out.shape[0], -1, 1, out.shape[-1])
    return out.transpose(1, 2).contiguous(), None


_scope = selection_module.scope
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling  # bound once (torch.compile recognises the function)


def _sdpa_router(original: AttentionFn) -> AttentionFn:
    return _attention_router(original, eager=False)


def _eager_router(original: AttentionFn, sinks: str | None = None) -> AttentionFn:
    return _attention_router(original, eager=True, sinks=sinks)


def _attention_router(original: AttentionFn, eager: bool, sinks: str | None = None) -> AttentionFn:
    """The router standing in for transformers' sdpa function or an eager one (``eager``) that is plain softmax
    attention, or gpt-oss's with its layer's sinks (``sinks``: why not to route a call that lacks them).

    sdpa never returns attention weights (it only warns about output_attentions), so routing it loses none; an
    eager call that asks for them runs the original. An eager function adds position_bias to the scores only if
    it names it (otherwise it lands in **kwargs); sdpa folds it with create_position_bias_mask (5.15+), and an
    older sdpa drops it, which only its own code does the same way. Likewise softcap is applied (and routed) only
    by an eager function that names it; sdpa raises on it (5.x) or ignores it, so such a call runs sdpa.
    """
    takes_bias = not eager or "position_bias" in calls.parameters(original)
    served = {"softcap"} if eager and "softcap" in calls.parameters(original) else set()
    served |= {"s_aux"} if sinks is not None else set()
    applied = frozenset(served)

    @functools.wraps(original)
    def attnpatch_attention(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        # Inline, as the layer scope does (patchers/sdpa.py): each call level costs more inside a model than
        # in a loop. The instance dict, not getattr: a missing attribute on an nn.Module raises inside (~1 us).
        namespace = getattr(module, "__dict__", None)
        mark = namespace.get(MODULE_ATTR) if namespace is not None else None
        context = _scope.context
        if mark is None and not state.route_all and context is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        # Dynamo reads neither the route cache nor a layer's name (see route_of and site_of).
        compiling = _is_dynamo_compiling()
        site = None if namespace is None or compiling else namespace.get(SITE_ATTR) or site_of(module)
        reason = calls.refusal(attention_mask, args, kwargs, applied)
        position_bias = kwargs.get("position_bias") if takes_bias else None
        extra: dict[str, Any] = {}
        if reason is None and eager and calls.weights_requested(module, kwargs):
            reason = calls.WEIGHTS_REQUESTED
        if reason is None and not eager and position_bias is not None and _create_position_bias_mask is None:
            reason = calls.BIAS_IGNORED
        if reason is None and applied:
            if "softcap" in applied and kwargs.get("softcap") is not None:
                extra["softcap"] = float(kwargs["softcap"])
            if sinks is not None:
                extra["sinks"] = calls.layer_sinks(module, kwargs)
                reason = sinks if extra["sinks"] is None else None
        if reason is not None:
            dispatch.note_passthrough(site, reason)
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        # The chain this call is routed with, found once: the layout _route chooses depends on it, and the
        # dispatcher takes it as the module's (the same precedence: a mark, else a block, else the default).
        if mark or context is None:
            chain = ((not compiling and routes.get(mark)) or route_of(mark, compiling))[0]
        else:
            chain = dispatch.effective_chain()
        return _route(module, query, key, value, attention_mask, kwargs, chain, site, eager, position_bias, extra)

    setattr(attnpatch_attention, _ROUTER_ATTR, original)
    return attnpatch_attention


def _router_for(fn: AttentionFn, implementation: str) -> AttentionFn:
    """The router for ``fn`` serving ``implementation``, made once and then returned every time.

    No lock: torch.compile cannot trace one, and two threads racing here make equal routers of which
    ``setdefault`` keeps the first, so every caller still gets the same function.
    """
    router = _routers.get((fn, implementation))
    if router is not None:
        return router
    if getattr(fn, _ROUTER_ATTR, None) is not None:
        router = fn  # already one of ours (a copy bound before a previous install): never wrap twice
    elif implementation == "sdpa" and fn is _stock_sdpa:
        router = _sdpa_router(fn)
    elif implementation == "eager":
        refusal = calls.plain_eager_refusal(fn)
        if refusal is None or calls.sinks_eager(fn):
            router = _eager_router(fn, sinks=refusal)
        else:
            router = forms.passthrough_router(fn, refusal, _ROUTER_ATTR)
    elif forms.form_of(fn) is not None:
        router = forms.router(fn, forms.form_of(fn) or "", _ROUTER_ATTR)
    elif implementation == "sdpa":
        reason = f"attn_implementation='sdpa' is overridden by {calls.describe(fn)}: left as registered"
        router = forms.passthrough_router(fn, reason, _ROUTER_ATTR)
    else:
        reason = (
            f"attn_implementation={implementation!r} runs {calls.describe(fn)}, not one of transformers' sdpa, "
            "eager, flash or flex functions that attnpatch routes: left as registered"
        )
        router = forms.passthrough_router(fn, reason, _ROUTER_ATTR)
    return _routers.setdefault((fn, implementation), router)


# Set when transformers.modeling_utils is patched: the stock sdpa function (the one routers may route) and
# whether an SDPA call without is_causal asks the layer (see _LAYER_DECIDES_CAUSAL_VERSION).
_stock_sdpa: Any = None
_create_position_bias_mask: Any = None  # transformers' own (5.15+), used to fold a position bias like its sdpa
_layer_decides_causal = True
# True where layers get even their eager function from get_interface (5.1+): nothing to patch per module.
_eager_by_interface = True
_redirect_acquired = False  # we hold the SDPA redirect (some imported layer calls F.sdpa itself)
_SDPA_NAME = "scaled_dot_product_attention"


# -------------------------------------------------------------------------------------------------- patching


def _patch_modeling_utils(modeling_utils: types.ModuleType) -> None:
    """Post-import hook of transformers.modeling_utils: wrap the attention lookup of this version."""
    global _layer_decides_causal, _stock_sdpa, _eager_by_interface, _create_position_bias_mask
    with _lock:
        if not installed():
            return
        version = transformers_version() or ()
        _layer_decides_causal = version >= _LAYER_DECIDES_CAUSAL_VERSION
        sdpa_module = sys.modules.get("transformers.integrations.sdpa_attention")
        _stock_sdpa = getattr(sdpa_module, "sdpa_attention_forward", None)
        _create_position_bias_mask = getattr(sdpa_module, "create_position_bias_mask", None)
        if _stock_sdpa is not None:
            _router_for(_stock_sdpa, "sdpa")  # made now, not inside a compiled region on the first call
        interface = getattr(modeling_utils, "AttentionInterface", None)
        _eager_by_interface = interface is not None and "get_interface" in vars(interface)
        if _eager_by_interface:
            if not PATCHER.patches.patched(interface, "get_interface"):
                wrapper = _get_interface_wrapper(interface.__dict__["get_interface"])
                PATCHER.patches.replace(interface, "get_interface", wrapper)
        elif getattr(modeling_utils, "ALL_ATTENTION_FUNCTIONS", None) is not None:
            # 4.51-5.0: the class-wide mapping every AttentionInterface instance reads; 4.48-4.50: a plain dict.
            # Its sdpa entry and the flash and flex entries (names registered later are not reached).
            functions = modeling_utils.ALL_ATTENTION_FUNCTIONS
            mapping: Any = getattr(interface, "_global_mapping", None) if interface is not None else functions
            for name in [n for n in mapping or () if n == "sdpa" or forms.form_of(mapping[n]) is not None]:
                if not PATCHER.patches.patched(mapping, name, True):
                    PATCHER.patches.replace(mapping, name, _router_for(mapping[name], name), mapping=True)
        # 4.46-4.47 have no mapping at all: their *SdpaAttention layers call F.sdpa, like falcon or sam today.


def _get_interface_wrapper(original: Callable[..., AttentionFn]) -> Callable[..., AttentionFn]:
    @functools.wraps(original)
    def get_interface(self: Any, attn_implementation: str, default: AttentionFn) -> AttentionFn:
        fn = original(self, attn_implementation, default)
        router = _routers.get((fn, attn_implementation))
        return router if router is not None else _router_for(fn, attn_implementation)

    setattr(get_interface, _ROUTER_ATTR, original)
    return get_interface


def _hook_modeling_modules() -> None:
    # Two things live in the modeling modules themselves, looked up when a layer runs, so patching a module
    # when it is imported (at once, if it already is) reaches every call: before 5.1 the global
    # `eager_attention_forward` an eager layer calls, and in every version the layers that call
    # F.scaled_dot_product_attention themselves. transformers imports each model lazily: package first, then
    # its modeling module, which imports modeling_utils before defining its classes. So the hooks are chained
    # by name from install(): models dir -> model package -> its modeling modules. (A hook registered from
    # modeling_utils's own hook would find the model's module half-executed, classes not defined yet.)
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return
    for package_dir in spec.submodule_search_locations:
        try:
            models = os.listdir(os.path.join(package_dir, "models"))
        except OSError:
            continue
        for model in models:
            if model.isidentifier() and not model.startswith("_"):
                PATCHER.when_imported(f"transformers.models.{model}", _hook_model_package)


def _hook_model_package(package: types.ModuleType) -> None:
    if not installed():
        return
    for directory in getattr(package, "__path__", ()):
        try:
            files = os.listdir(directory)
        except OSError:
            continue
        for filename in files:
            if filename.startswith("modeling_") and filename.endswith(".py"):
                PATCHER.when_imported(f"{package.__name__}.{filename[:-3]}", _patch_modeling_module)


def _patch_modeling_module(module: types.ModuleType) -> None:
    global _redirect_acquired
    with _lock:
        if not installed():
            return
        fn = module.__dict__.get("eager_attention_forward")
        if not _eager_by_interface and callable(fn) and getattr(fn, _ROUTER_ATTR, None) is None:
            PATCHER.patches.replace(module, "eager_attention_forward", _router_for(fn, "eager"))
        for cls in list(vars(module).values()):
            if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__ == module.__name__):
                continue
            for name, member in list(vars(cls).items()):
                if not isinstance(member, types.FunctionType) or getattr(member, _ROUTER_ATTR, None) is not None:
                    continue
                # unwrap: decorators such as @deprecate_kwarg hide the code that makes the call
                if _SDPA_NAME in code_names(inspect.unwrap(member).__code__):
                    if not _redirect_acquired:
                        sdpa.acquire()
                        _redirect_acquired = True
                    PATCHER.patches.replace(cls, name, _sdpa_scope(member))


def _sdpa_scope(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a layer's method that calls F.scaled_dot_product_attention itself in a redirect scope.

    Inside the scope (this thread, this call) the redirect of :mod:`attnpatch.patchers.sdpa` sends each SDPA
    call to the dispatcher with the layer's selection; a call it cannot express there runs SDPA, counted.
    """

    attnpatch_sdpa_scope = sdpa.layer_scope(method, layer_arg=False, redirect=True)
    setattr(attnpatch_sdpa_scope, _ROUTER_ATTR, method)
    return attnpatch_sdpa_scope


# ------------------------------------------------------------------------------------------- the contract


def attention_modules(root: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The transformers attention layers inside ``root``: modules whose class calls an attention function.

    A layer qualifies when a method of its class (or of a transformers base class) looks up transformers'
    attention function (``ALL_ATTENTION_FUNCTIONS``, ``get_interface``, a module's ``eager_attention_forward``)
    or calls ``F.scaled_dot_product_attention`` itself: exactly the calls the routers and the SDPA redirect
    reach. Whole models (``PreTrainedModel``) are never attention layers themselves, and layers that compute
    attention inline (matmul + softmax, as eager layers did before 4.48) are not named: nothing would route them.
    """
    found = [(name, module) for name, module in root.named_modules() if _is_attention_class(type(module))]
    if installed():
        for cls in {type(module) for _, module in found}:
            _prepare_eager_routers(cls)
    return found


def _prepare_eager_routers(cls: type) -> None:
    # transformers 5 passes the modeling module's eager function as get_interface's default: make its router
    # now, so a compiled first call finds it instead of building it inside the traced region.
    for klass in cls.__mro__:
        fn = getattr(sys.modules.get(klass.__module__), "eager_attention_forward", None)
        if callable(fn) and getattr(fn, _ROUTER_ATTR, None) is None:
            _router_for(fn, "eager")


_ATTENTION_LOOKUPS = frozenset({"ALL_ATTENTION_FUNCTIONS", "get_interface", "eager_attention_forward", _SDPA_NAME})


_attention_classes: dict[type, bool] = {}


def _is_attention_class(cls: type) -> bool:
    known = _attention_classes.get(cls)
    if known is None:
        known = _attention_classes.setdefault(cls, _calls_attention(cls))
    return known


def _calls_attention(cls: type) -> bool:
    if not any(klass.__module__.startswith("transformers.") for klass in cls.__mro__):
        return False
    if any(klass.__module__ == "transformers.modeling_utils" for klass in cls.__mro__):
        return False  # whole models (PreTrainedModel) look the mapping up too, to validate attn_implementation
    for klass in cls.__mro__:
        if klass is torch.nn.Module or klass is object:
            break
        for member in vars(klass).values():
            if isinstance(member, staticmethod | classmethod):
                member = member.__func__
            code = getattr(inspect.unwrap(member), "__code__", None) if callable(member) else None
            if code is not None and _ATTENTION_LOOKUPS.intersection(code_names(code)):
                return True
    return False


def unsupported() -> list[str]:
    """Reasons the installed transformers cannot be (fully) patched; empty when everything is reached."""
    version = transformers_version()
    if version is None:
        return []
    shown = ".".join(str(v) for v in version)
    if version < OLDEST_VERSION:
        return [f"transformers {shown} is older than 4.46: not patched (pip install -U 'transformers>=4.46')"]
    if version < MAPPING_VERSION:
        return [
            f"transformers {shown} computes eager attention inline in each layer: layers loaded with "
            "attn_implementation='eager' are not routed (load the model with attn_implementation='sdpa')"
        ]
    if version[:2] > NEWEST_TESTED:
        return [
            f"transformers {shown} is newer than {'.'.join(map(str, NEWEST_TESTED))}, the newest attnpatch was tested "
            "with: its attention functions are routed, anything it changed since is not verified"
        ]
    return []


class TransformersPatcher(Patcher):
    """Wraps transformers' attention lookup now if it is imported, else as soon as it is.

    Installing routes nothing by itself: a router sends a call to the dispatcher only for layers marked by
    apply / set_attention_backend, or for every layer while ``state.route_all`` is set. Uninstalling puts back
    every function and mapping entry we replaced (bitwise-identical results).
    """

    library = "transformers"

    def _install(self) -> None:
        self.when_imported("transformers.modeling_utils", _patch_modeling_utils)
        _hook_modeling_modules()

    def _uninstall(self) -> None:
        global _redirect_acquired
        PATCHER.patches.restore()
        if _redirect_acquired:
            sdpa.release()
            _redirect_acquired = False

    attention_modules = staticmethod(attention_modules)

    unsupported = staticmethod(unsupported)


PATCHER = TransformersPatcher()
_lock = PATCHER.lock
install = PATCHER.install
uninstall = PATCHER.uninstall
installed = PATCHER.installed
