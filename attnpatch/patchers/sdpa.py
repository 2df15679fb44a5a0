"""A scoped redirect of ``torch.nn.functional.scaled_dot_product_attention`` into the dispatcher.

Legacy diffusers processors (and some transformers models) call ``F.scaled_dot_product_attention`` themselves,
looking the name up on the ``torch.nn.functional`` module at every call. While a patcher holds this module
(:func:`acquire`), that attribute is a thin function that calls the original SDPA unchanged, except inside a
scope a patcher opened on this thread (:func:`layer_scope`, or :func:`enter` / :func:`leave`: a thread-local
depth). Inside such a scope the call goes to :func:`attnpatch.core.dispatch.route_bhsd` with the per-module
selection the patcher pushed; in the scope of a layer whose selection is torch's SDPA itself on the fast path
(:func:`attnpatch.core.dispatch.runs_sdpa`: ``native``, nothing watching) it goes to torch's SDPA as written,
which is what the dispatcher would do, minus the routing. The behaviour of SDPA calls anywhere else (other
threads, other models) does not change; ``native`` calls torch's SDPA builtin, never this function.

Layout: SDPA's (batch, heads, seq, head_dim) goes to the dispatcher as it is (``route_bhsd``), so the ``native``
backend sees exactly the tensors (same strides) the caller passed; other backends get transposed views.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from attnpatch.core import dispatch, forksafe, selection
from attnpatch.core.call import SdpaArgs
from attnpatch.core.selection import Chain
from attnpatch.patchers import MODULE_ATTR, SITE_ATTR, state
from attnpatch.patchers._layers import route_of, routes, site_of

if TYPE_CHECKING:
    from typing_extensions import Unpack


class _Local(threading.local):
    # Set per thread on its first use: an attribute found in the class on one call and in the thread's own dict
    # on the next would make a compiled frame that read it recompile (dynamo guards on where it was found).
    # > 0: inside that many redirect scopes; 0: none (SDPA calls go to the function we replaced); AS_WRITTEN: in
    # a layer whose selection runs torch's SDPA unchanged (dispatch.runs_sdpa), so its SDPA calls go there as they
    # are, whatever F.scaled_dot_product_attention was before us.
    depth: int

    def __init__(self) -> None:
        self.depth = 0


AS_WRITTEN = -1


_local = _Local()
_scope = selection.scope  # the selection the patcher pushed for the module running on this thread
_lock = forksafe.Lock()
_sdpa = torch._C._nn.scaled_dot_product_attention  # torch's SDPA builtin (what F.scaled_dot_product_attention is)
_users = 0
# The function that was F.scaled_dot_product_attention when we replaced it (None while not installed).
_original: Callable[..., torch.Tensor] | None = None


def acquire() -> None:
    """Install the redirect (reference-counted: each patcher that needs it acquires it once)."""
    global _users, _original
    with _lock:
        if _users == 0:
            _original = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = scaled_dot_product_attention
        _users += 1


def release() -> None:
    """Undo one :func:`acquire`; the last one restores the original function object."""
    global _users, _original
    with _lock:
        if _users == 0:
            return
        _users -= 1
        if _users == 0:
            # Restore only if nobody replaced it after us; otherwise leave their function in place.
            if F.scaled_dot_product_attention is scaled_dot_product_attention and _original is not None:
                F.scaled_dot_product_attention = _original
            _original = None


def installed() -> bool:
    return _users > 0


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """F.scaled_dot_product_attention is the original again inside the block (this process, all threads): a
    benchmark times unpatched code without the redirect's passthrough wrapper."""
    swapped = _original is not None and F.scaled_dot_product_attention is scaled_dot_product_attention
    if swapped:
        F.scaled_dot_product_attention = _original  # type: ignore[assignment]
    try:
        yield
    finally:
        if swapped and F.scaled_dot_product_attention is _original:
            F.scaled_dot_product_attention = scaled_dot_product_attention


def enter() -> int:
    """Open a redirect scope on this thread; pass the return value to :func:`leave`."""
    local = _local
    saved = local.depth
    local.depth = saved + 1 if saved > 0 else 1
    return saved


def leave(saved: int) -> None:
    _local.depth = saved


def redirecting() -> bool:
    """Whether a redirect scope is open on this thread (:func:`route` / :func:`route_bhsd` then suspend it)."""
    return _local.depth > 0


def layer_scope(
    method: Callable[..., Any], *, layer_arg: bool, redirect: bool, dispatcher: bool = False
) -> Callable[..., Any]:
    """``method`` (a layer's method, or a diffusers processor's ``__call__``) run in the scope of its layer.

    The layer is ``self`` (``layer_arg=False``) or, for a processor called as ``processor(attn, ...)``, its first
    argument. When the layer is marked, routing is process-wide or an ``attention_backend()`` block is open on this
    thread, the call runs with the layer's selection and name pushed (:mod:`attnpatch.core.selection`'s scope:
    its mark's chain, else the process default when no block is open, so that code reached inside knows the call
    is routed) and, with ``redirect``, inside a redirect scope: its F.scaled_dot_product_attention calls go to the
    dispatcher. ``dispatcher``: ``method`` also calls a replaced dispatcher function that reads the pushed scope.

    A layer whose selection runs torch's SDPA as it is (:func:`attnpatch.core.dispatch.runs_sdpa`: ``native`` on
    the fast path) and whose method only calls SDPA runs ``method`` untouched, as without attnpatch: that is what
    routing would do. Anything not routed runs ``method`` with one dict lookup and two attribute reads added.

    This is every routed legacy diffusers processor call and every transformers layer that calls SDPA itself, so
    the scope is written inline: each call to push_module, pop_module, enter or leave would cost ~0.1 us.
    """
    scope, local = _scope, _local
    is_dynamo_compiling, runs_sdpa = torch.compiler.is_dynamo_compiling, dispatch.runs_sdpa
    untouched_when_native = redirect and not dispatcher

    @functools.wraps(method)
    def scoped(self: Any, *args: Any, **kwargs: Any) -> Any:
        layer = self if not layer_arg else args[0] if args else kwargs.get("attn")
        namespace = getattr(layer, "__dict__", None)
        # The instance dict, not getattr: a missing attribute on an nn.Module costs an exception (~1 us).
        mark = namespace.get(MODULE_ATTR) if namespace is not None else None
        context = scope.context
        if mark is None and context is None and not state.route_all:
            return method(self, *args, **kwargs)
        # Dynamo reads neither the cache below (a traced read guards on what it holds then, so filling it in
        # an eager call later would recompile) nor a layer's name (a guard on each layer's own name).
        compiling = is_dynamo_compiling()
        if mark or context is None:  # a mark wins over any block; without one the process default decides
            chain, native = (not compiling and routes.get(mark)) or route_of(mark, compiling)
        else:  # FOLLOW or unmarked inside an attention_backend() block: the block's chain, read per call
            chain, native = None, runs_sdpa(None)
        if native and untouched_when_native and _original is _sdpa:
            return method(self, *args, **kwargs)
        site = None if namespace is None or compiling else namespace.get(SITE_ATTR) or site_of(layer)
        saved_module, saved_site, depth = scope.module, scope.site, local.depth
        scope.module, scope.site = chain, site
        if redirect:
            # A native layer's SDPA calls go to torch's SDPA as written (whatever F's function was before us).
            local.depth = AS_WRITTEN if native else depth + 1 if depth > 0 else 1
        try:
            return method(self, *args, **kwargs)
        finally:
            if redirect:
                local.depth = depth
            scope.module, scope.site = saved_module, saved_site

    return scoped


class Router(Protocol):
    """:func:`route` and :func:`route_bhsd`: the calling convention's eight (attnpatch/core/call.py), the calling
    layer's selection and name, the dispatcher's later arguments."""

    def __call__(
        self, *args: Unpack[SdpaArgs], module_chain: Chain | None = None, site: str | None = None, **extra: Any
    ) -> Any: ...


def _suspending(router: Callable[..., Any], doc: str) -> Router:
    # ``router`` (dispatch.route or dispatch.route_bhsd) with the redirect suspended on this thread. One body for
    # both, bound here rather than passed per call: no extra Python call level on the per-call path.
    def suspended(
        *args: Unpack[SdpaArgs], module_chain: Chain | None = None, site: str | None = None, **extra: Any
    ) -> Any:
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = args
        local = _local
        saved = local.depth
        if saved:  # written only inside a redirect scope: a write in a traced frame would fail dynamo's own guard
            local.depth = 0  # on this thread-local in the same frame (torch 2.13)
        try:
            # A call that spreads **extra builds a dict of every keyword (~0.4 us), even when extra is empty.
            if extra:
                return router(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa, module_chain=module_chain, site=site,
                              **extra)  # fmt: skip
            return router(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa, module_chain=module_chain, site=site)  # fmt: skip
        finally:
            if saved:
                local.depth = saved

    suspended.__name__ = suspended.__qualname__ = router.__name__
    suspended.__doc__ = doc
    return suspended


route = _suspending(
    dispatch.route,
    """:func:`attnpatch.core.dispatch.route` with the redirect suspended, (batch, seq, heads, head_dim) tensors.

    Every patcher routes through here (or :func:`route_bhsd`) while a redirect scope may be open: a backend that
    calls F.scaled_dot_product_attention itself (a user's; ``native`` calls torch's builtin) must reach torch, not
    come back to the dispatcher (e.g. a transformers layer that calls both its attention function and F.sdpa).
    ``args``: the calling convention's eight (attnpatch/core/call.py). ``module_chain`` and ``site``: the calling
    layer's selection and name, when the patcher has them (default: what the patcher pushed). ``extra``: the
    dispatcher's later arguments (softcap, window, sinks, return_lse), passed on only when given.
    """,
)
route_bhsd = _suspending(
    dispatch.route_bhsd,
    """:func:`route` for SDPA's layout, query (batch, heads, seq_q, head_dim), key/value (batch, heads_kv, seq_kv,
    head_dim) -> out (batch, heads, seq_q, head_dim_v): :func:`attnpatch.core.dispatch.route_bhsd`.""",
)


def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Stands in for F.scaled_dot_product_attention while installed; see the module docstring."""
    depth = _local.depth
    if depth == 0 or _original is None:
        return (_original or _sdpa)(*args, **kwargs)
    if depth < 0:  # AS_WRITTEN: the layer's selection is torch's SDPA itself
        return _sdpa(*args, **kwargs)
    out = _redirect(*args, **kwargs)
    # None: a call we cannot express in the dispatcher's terms, counted; it goes to the original SDPA unchanged.
    return _original(*args, **kwargs) if out is None else out


scaled_dot_product_attention.__doc__ = F.scaled_dot_product_attention.__doc__


def _redirect(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor | None:
    # q: (batch, heads, seq_q, head_dim); k, v: (batch, heads_kv, seq_kv, head_dim). None for a call to leave to
    # the original SDPA, counted as a passthrough. Runs only inside a redirect scope (depth > 0), which it suspends
    # around the dispatcher itself (route_bhsd's body, inline: one Python call level less on every redirected call).
    query_shape, key_shape = query.shape, key.shape  # read once: each read of a tensor's shape costs ~0.1 us
    reason = None
    if len(query_shape) != 4 or len(key_shape) != 4 or (query_shape[1] != key_shape[1] and not enable_gqa):
        reason = passthrough_reason(query, key, value, enable_gqa)
    mask = None
    if reason is None and attn_mask is not None:
        mask, reason = sdpa_mask(attn_mask, query_shape[0], query_shape[1], query_shape[2], key_shape[2])
    if reason is not None:
        if not torch.compiler.is_compiling():
            dispatch.note_passthrough(selection.current_site(), reason)
        return None
    local = _local
    saved = local.depth
    local.depth = 0
    try:
        out: torch.Tensor = dispatch.route_bhsd(
            query, key, value, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa, module_chain=_scope.module
        )  # fmt: skip
    finally:
        local.depth = saved
    return out


def passthrough_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool) -> str | None:
    """Why an SDPA-layout call (batch, heads, seq, head_dim) must go to the original SDPA, or None to route it."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return f"F.scaled_dot_product_attention with {query.dim()}-D query (only 4-D batch, heads, seq, dim is routed)"
    if query.shape[1] != key.shape[1] and not enable_gqa:
        # SDPA raises here while the dispatcher would serve it: keep the caller's error.
        return f"{query.shape[1]} query heads with {key.shape[1]} key heads and enable_gqa=False"
    return None


def sdpa_mask(
    attn_mask: Any, batch: int, heads: int, seq_q: int, seq_kv: int
) -> tuple[torch.Tensor | None, str | None]:
    """``attn_mask`` as SDPA reads it, made 4-D (batch|1, heads|1, seq_q|1, seq_kv), or a reason not to route.

    SDPA broadcasts a mask from the right, so (seq_q, seq_kv) and (heads, seq_q, seq_kv) are valid SDPA masks;
    the dispatcher reads a 2-D mask as key padding and a 3-D one as (batch, seq_q, seq_kv). Making the mask 4-D
    in SDPA's sense first keeps its meaning.
    """
    if not isinstance(attn_mask, torch.Tensor):
        name = type(attn_mask).__name__
        return None, "attn_mask is a flex BlockMask" if name == "BlockMask" else f"attn_mask of type {name}"
    if attn_mask.dim() > 4:
        return None, f"attn_mask with {attn_mask.dim()} dims"
    if attn_mask.dim() < 4:
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    b, h, q, k = attn_mask.shape
    if b not in (1, batch) or h not in (1, heads) or q not in (1, seq_q) or k != seq_kv:
        return None, (
            f"attn_mask of shape {tuple(attn_mask.shape)} that does not broadcast to (batch={batch}, "
            f"heads={heads}, seq_q={seq_q}, seq_kv={seq_kv}) per key"
        )
    return attn_mask, None
