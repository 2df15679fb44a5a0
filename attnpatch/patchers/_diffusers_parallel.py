"""diffusers calls that ask for the log-sum-exp, and context parallelism (ring, Ulysses), on attnpatch backends.

A diffusers processor passes ``parallel_config`` to ``dispatch_attention_fn`` once ``model.enable_parallelism`` ran.
diffusers' backend then calls ``_templated_context_parallel_attention(..., forward_op=, backward_op=)``, whose
``torch.autograd.Function``\\ s (TemplatedRingAttention, TemplatedUlyssesAttention and their "anything" and unified
variants) do every collective: ring's all-gather of the key/value chunks and its merge of the partial outputs by
their log-sum-exp, Ulysses' all-to-alls between sequence and head shards, the all-gather of a key-padding mask. The
op pair only computes the local attention. :func:`parallel_attention` calls that same function with our pair:

- forward: the local attention through :func:`attnpatch.core.dispatch.route` (the layer's selection, fallbacks,
  report), with ``return_lse=True`` where diffusers needs the log-sum-exp (every ring step) or the backward will.
  A backend that cannot give it refuses such a call and the chain falls back (``_native_math`` serves it).
- backward: the flash-attention backward formulas in PyTorch operations (float32, query blocks of bounded size),
  from the saved q/k/v and the output and log-sum-exp diffusers hands it (ring: the merged, global ones). It is the
  gradient of exact softmax attention at the forward's output, as flash-attn's backward kernel computes it; the
  backend itself is not asked for a backward (its forward runs inside the Function, where grad is off).

Calls without ``parallel_config`` that ask for ``return_lse`` get ``(out, lse)`` from ``sdpa.route(...,
return_lse=True)``. diffusers' own backends disagree on that layout outside context parallelism (flash-attn:
(batch, heads, seq), sage: (batch, seq, heads)); ours is always the one its context parallelism uses: (batch,
seq_q, heads) float32.

What we leave to diffusers (:func:`parallel_reason` says why; the patcher counts it as a passthrough): a causal or
GQA call (diffusers' templated attention raises for both), a mask under ring attention (diffusers applies each
rank's mask to every key chunk of the ring), a mask that is not a key-padding mask of the rank's keys, dropout
under grad (the backward cannot redraw the forward's dropout), a config without context parallelism, a diffusers
without the templated function, and ring attention of a diffusers older than the ring op contract we follow (0.42:
a (batch, seq, heads) log-sum-exp from forward ops, each step's chunk and the merged out/lse in the backward).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from attnpatch.core import masks
from attnpatch.core.call import MASK_ADDITIVE, SdpaArgs
from attnpatch.patchers import sdpa

if TYPE_CHECKING:
    from typing_extensions import Unpack

DISPATCH_MODULE = "diffusers.models.attention_dispatch"
TEMPLATED = "_templated_context_parallel_attention"
# Scores of at most this many elements (float32) per query block in the backward: 64 Mi = 256 MiB.
BACKWARD_BLOCK_ELEMENTS = 1 << 26


def parallel_reason(parallel_config: Any, *args: Unpack[SdpaArgs]) -> str | None:
    """Why a context-parallel call goes to diffusers' own code (None: :func:`parallel_attention` serves it).

    query: (batch, seq_q_local, heads, head_dim); key/value: (batch, seq_kv_local, heads, head_dim), this rank's
    shard.
    """
    query, key, value, attn_mask, dropout_p, is_causal, _, enable_gqa = args
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return "parallel_config without a context_parallel_config"
    if _templated() is None:
        return f"this diffusers has no {TEMPLATED} taking forward_op/backward_op (context parallelism unchanged)"
    if is_causal:
        return "causal attention under context parallelism (diffusers' templated attention refuses it)"
    if enable_gqa or query.shape[2] != key.shape[2]:
        return "GQA under context parallelism (diffusers' templated attention refuses it)"
    if (
        dropout_p > 0.0
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad)
    ):
        return "dropout under grad with context parallelism (the backward cannot redraw the forward's dropout)"
    if getattr(cp, "ring_degree", 1) > 1:
        reason = _ring_reason()
        if reason is not None:
            return reason
    if attn_mask is not None:
        if getattr(cp, "ring_degree", 1) > 1:
            return "attn_mask under ring attention (diffusers applies each rank's mask to every key chunk of the ring)"
        if _local_key_padding(attn_mask, query, key) is None:
            shape = tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
            return (
                f"attn_mask {shape} under Ulysses attention (only a key-padding mask of the rank's keys, "
                f"(batch, {key.shape[1]}) or (batch|1, 1, 1, {key.shape[1]}), is served)"
            )
    return None


def parallel_attention(parallel_config: Any, return_lse: bool, *args: Unpack[SdpaArgs]) -> Any:
    """diffusers' templated ring / Ulysses attention with attnpatch's op pair; the call passed :func:`parallel_reason`.

    query/key/value: (batch, seq_local, heads, head_dim), this rank's shard -> out (batch, seq_q_local, heads,
    head_dim), and with ``return_lse`` (out, lse (batch, seq_q_local, heads) float32).
    """
    query, key, value, attn_mask, *rest = args
    templated = _templated()
    assert templated is not None  # parallel_reason said so
    mask = None if attn_mask is None else _local_key_padding(attn_mask, query, key)
    call = (query, key, value, mask, *rest, return_lse)
    out = templated(*call, forward_op=forward_op, backward_op=backward_op, _parallel_config=parallel_config)
    if return_lse:
        out, lse = out[0], out[1]
        return out, lse
    return out


# --- the op pair diffusers' templated attention calls -------------------------------------------------------------


# What diffusers' templated attention passes its forward op after ``ctx``, positionally (0.42 attention_dispatch.py,
# every call of ``forward_op``): the calling convention's eight (attnpatch/core/call.py) and return_lse.
ForwardOpArgs: TypeAlias = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float, bool, float | None, bool, bool
]


def forward_op(ctx: Any, *args: Unpack[ForwardOpArgs], _save_ctx: bool = True, _parallel_config: Any = None) -> Any:
    """The local attention of one ring step or of Ulysses' gathered sequence, (batch, seq, heads, head_dim).

    Runs inside the Function's forward (grad off). ``ctx.needs_input_grad`` tells whether a backward will follow:
    then the output and log-sum-exp are saved for :func:`backward_op` (ring: only at its first step, whose q/k/v
    are the rank's own; its backward hands the merged out/lse in).
    """
    call, return_lse = args[:8], args[8]
    query, key, value, attn_mask, _, _, scale, _ = call
    needs_grad = _save_ctx and any(getattr(ctx, "needs_input_grad", (False,))[:3])
    lse = None
    # sdpa.route suspends the F.sdpa redirect of a processor that calls both functions while we route (the native
    # backend's own F.sdpa call must reach torch), without a thread-local write in a traced frame.
    if return_lse or needs_grad:
        out, lse = sdpa.route(*call, return_lse=True)
    else:
        out = sdpa.route(*call)
    if _save_ctx:
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.attn_mask = attn_mask
        ctx.scale = scale
    return (out, lse) if return_lse else out


def backward_op(
    ctx: Any,
    grad_out: torch.Tensor,
    *args: Any,
    query: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v (each in its input's layout and dtype) for grad_out (batch, seq_q, heads, head_dim_v).

    Ring passes the rotated key/value chunk and the merged out/lse of every step; Ulysses uses what the forward
    saved. With P = exp(s - lse) (s the scaled, masked scores): dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
    dQ = scale * dS K, dK = scale * dS^T Q.
    """
    saved_q, saved_k, saved_v, saved_out, saved_lse = ctx.saved_tensors
    query = saved_q if query is None else query
    key = saved_k if key is None else key
    value = saved_v if value is None else value
    out = saved_out if out is None else out
    lse = saved_lse if lse is None else lse
    if lse is None:
        raise RuntimeError("attnpatch: the forward saved no log-sum-exp for this backward (report this)")
    scale = ctx.scale if ctx.scale is not None else query.shape[-1] ** -0.5
    mask, kind = (None, "") if ctx.attn_mask is None else masks.normalize(ctx.attn_mask, query, key)
    q, k, v, o, do = (x.transpose(1, 2).float() for x in (query, key, value, out, grad_out))  # (B, H, S, D)
    lse = lse.transpose(1, 2).float().unsqueeze(-1)  # (B, H, Sq, 1)
    rows = lse.isfinite()  # query rows that attended to some key (no key: out 0, lse -inf, no gradient)
    delta = (do * o).sum(-1, keepdim=True)
    grad_q = torch.empty_like(q)
    grad_k = torch.zeros_like(k)
    grad_v = torch.zeros_like(v)
    block = max(1, BACKWARD_BLOCK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
    for start in range(0, q.shape[2], block):
        part = slice(start, start + block)
        scores = (q[:, :, part] @ k.transpose(-1, -2)) * scale
        if mask is not None:
            piece = mask[:, :, part] if mask.shape[2] > 1 else mask
            scores = scores + piece.float() if kind == MASK_ADDITIVE else scores.masked_fill(~piece, float("-inf"))
        probs = torch.where(rows[:, :, part], torch.exp(scores - lse[:, :, part]), 0.0)
        grad_v += probs.transpose(-1, -2) @ do[:, :, part]
        grad_scores = probs * (do[:, :, part] @ v.transpose(-1, -2) - delta[:, :, part])
        grad_q[:, :, part] = (grad_scores @ k) * scale
        grad_k += (grad_scores.transpose(-1, -2) @ q[:, :, part]) * scale
    return (
        grad_q.transpose(1, 2).to(query.dtype),
        grad_k.transpose(1, 2).to(key.dtype),
        grad_v.transpose(1, 2).to(value.dtype),
    )


# --- helpers -------------------------------------------------------------------------------------------------------


def _local_key_padding(attn_mask: Any, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    # A key-padding mask of this rank's keys, made (batch|1, 1, 1, seq_kv_local) as diffusers' native backend
    # makes a 2-D one: Ulysses all-gathers a mask whose last dim is the local key count, along that dim, in rank
    # order, which is the order of the gathered keys. None for any other mask.
    if not isinstance(attn_mask, torch.Tensor):
        return None
    batch, seq_kv = query.shape[0], key.shape[1]
    if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (batch, seq_kv):
        return attn_mask[:, None, None, :]
    if attn_mask.dim() == 4 and attn_mask.shape[0] in (1, batch) and tuple(attn_mask.shape[1:]) == (1, 1, seq_kv):
        return attn_mask
    return None


@functools.cache
def _templated_of(module: Any) -> Callable[..., Any] | None:
    function = getattr(module, TEMPLATED, None)
    if not callable(function):
        return None
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return None
    return function if {"forward_op", "backward_op", "_parallel_config"} <= parameters.keys() else None


@functools.cache
def _ring_reason_of(module: Any) -> str | None:
    # The ring contract our op pair follows (diffusers 0.42): the forward merges a (batch, seq, heads) log-sum-exp
    # (it adds the trailing dim itself), and the backward hands each step's key/value chunk and the merged out/lse
    # to the op. Earlier templated rings expect a (batch, seq, heads, 1) lse from forward ops on torch >= 2.9 (it
    # would broadcast wrongly) and re-run the backward op on the first step's tensors: left to diffusers.
    ring: Any = getattr(module, "TemplatedRingAttention", None)
    try:
        forward, backward = inspect.getsource(ring.forward), inspect.getsource(ring.backward)
    except (AttributeError, OSError, TypeError):
        return "ring attention of a diffusers whose TemplatedRingAttention source cannot be read (contract unknown)"
    if "lse.ndim == 3" not in forward or "lse=lse" not in backward:
        return (
            "ring attention of a diffusers older than the ring op contract attnpatch follows (a (batch, seq, heads) "
            "log-sum-exp, the merged out/lse in the backward: diffusers 0.42)"
        )
    return None


def _ring_reason() -> str | None:
    module = sys.modules.get(DISPATCH_MODULE)
    return "ring attention without diffusers' attention_dispatch" if module is None else _ring_reason_of(module)


def _templated() -> Callable[..., Any] | None:
    module = sys.modules.get(DISPATCH_MODULE)
    return None if module is None else _templated_of(module)
