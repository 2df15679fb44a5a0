"""A scoped redirect of ``torch.nn.functional.scaled_dot_product_attention`` into the dispatcher.

Legacy diffusers processors (and some transformers models) call ``F.scaled_dot_product_attention`` themselves,
looking the name up on the ``torch.nn.functional`` module at every call. While a patcher holds this module
(:func:`acquire`), that attribute is a thin function that calls the original SDPA unchanged, except inside a
scope a patcher opened on this thread (:func:`enter` / :func:`leave`, a thread-local depth). Inside such a scope
the call goes to :func:`attnpatch.core.dispatch.route_bhsd` with the per-module selection the patcher pushed. The
behaviour of SDPA calls anywhere else (other threads, other models) does not change; ``native`` calls torch's
SDPA builtin, never this function.

Layout: SDPA's (batch, heads, seq, head_dim) goes to the dispatcher as it is (``route_bhsd``), so the ``native``
backend sees exactly the tensors (same strides) the caller passed; other backends get transposed views.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from attnpatch.core import dispatch, forksafe, selection
from attnpatch.core.call import SdpaArgs
from attnpatch.core.selection import Chain

if TYPE_CHECKING:
    from typing_extensions import Unpack


class _Local(threading.local):
    # Class attributes are the per-thread defaults: reading them costs no fallback lookup.
    depth: int = 0


_local = _Local()
_scope = selection.scope  # the selection the patcher pushed for the module running on this thread
_lock = forksafe.Lock()
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
    local.depth = saved + 1
    return saved


def leave(saved: int) -> None:
    _local.depth = saved


def redirecting() -> bool:
    """Whether a redirect scope is open on this thread (:func:`route` / :func:`route_bhsd` then suspend it)."""
    return _local.depth > 0


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
    if _local.depth == 0 or _original is None:
        return (_original or torch._C._nn.scaled_dot_product_attention)(*args, **kwargs)
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
