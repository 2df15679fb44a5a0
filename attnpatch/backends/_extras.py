"""Helpers for the later arguments (softcap, window, sinks, return_lse) that several backend families share.

- :func:`add_sinks`: sinks served from a kernel's output and log-sum-exp, out * sigmoid(lse - sink), for kernels
  that return the lse but take no sinks (the formula of the dispatcher's contract, attnpatch/core/call.py).
- :func:`lse_bhs`: a kernel's lse in (batch, heads, seq_q) to the dispatcher's (batch, seq_q, heads) float32, with
  the rows that attend no key set to -inf (kernels write 0 or +inf there: flash-attn 2's softmax.h sets
  ``INFINITY`` for an empty row outside split-KV).
- :func:`cpu_flash_lse`: torch's CPU flash kernel, the one aten operator on CPU that returns the lse.
- :func:`fold_window`: a window into the mask, for kernels that take masks but no window;
  :func:`window_as_mask` wraps such a backend function into one that takes ``window``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from attnpatch.core import masks
from attnpatch.core.call import SdpaArgs

if TYPE_CHECKING:
    from typing_extensions import Unpack


def add_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """out (batch, seq_q, heads, head_dim_v), lse (batch, seq_q, heads) float32, sinks (heads,) -> out with the
    sinks in the softmax denominator, in out's dtype. Rows with lse -inf stay 0 (sigmoid(-inf) = 0)."""
    factor = torch.sigmoid(lse - sinks.to(torch.float32))
    return (out.to(torch.float32) * factor.unsqueeze(-1)).to(out.dtype)


def lse_bhs(lse: torch.Tensor, empty: torch.Tensor | None = None) -> torch.Tensor:
    """A kernel's lse (batch, heads, seq_q) -> (batch, seq_q, heads) float32; ``empty``: True for the query rows
    with no key to attend, (batch|1, seq_q|1, heads|1) or None for none, where the result is -inf."""
    lse = lse.transpose(1, 2).to(torch.float32)
    lse = lse.masked_fill(lse == float("inf"), float("-inf"))  # flash-attn's CUDA kernel writes +inf there
    if empty is not None:
        lse = lse.masked_fill(empty, float("-inf"))
    return lse


def empty_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B|1, Sq|1, 1|H) True where a normalised mask (B|1, 1|H, Sq|1, Skv) leaves a query row no key; None without
    a mask."""
    if mask is None:
        return None
    return (~masks.to_bool(mask).any(dim=-1)).transpose(1, 2)


def fold_window(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    window: tuple[int, int] | None,
) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) with ``window`` (and causality, when both are given) folded into the mask."""
    if window is None:
        return attn_mask, is_causal
    if is_causal:  # causal and a window (left, right): the window (left, 0)
        window = (window[0], 0)
    return masks.fold_window(attn_mask, window, query.shape[1], key.shape[1], query.device), False


def window_as_mask(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn``, a backend function that takes masks, for calls with a sliding window: the window (top-left aligned,
    with causality when both are given) is folded into the mask first. For the backend's ``extra_fn``."""

    def with_window(*args: Unpack[SdpaArgs], window: tuple[int, int] | None = None) -> torch.Tensor:
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = args
        attn_mask, is_causal = fold_window(query, key, attn_mask, is_causal, window)
        return fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    with_window.__name__ = with_window.__qualname__ = f"{fn.__name__}_window"
    return with_window


def cpu_flash_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (batch, seq_q, heads, head_dim), lse (batch, seq_q, heads) float32) from
    ``aten::_scaled_dot_product_flash_attention_for_cpu``, tensors (batch, seq, heads, head_dim) on CPU.

    What it does in torch 2.13 (measured): lse (batch, heads, seq_q), natural log, float32 for half inputs and
    float64 for float64; GQA when key/value heads divide the query heads (repeat_interleave order, like SDPA);
    masks only additive in the query's dtype ("Attention mask is the same data type as query" for bool); one head
    dim for q, k and v; no dropout; a row with no key gives out 0 but lse 0 (made -inf here); the lse has no
    gradient (the caller keeps calls that need one away).
    """
    bias = None if attn_mask is None else masks.to_additive(attn_mask, query.dtype)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale
    )
    return out.transpose(1, 2), lse_bhs(lse, empty_rows(attn_mask))


def cpu_flash_lse_serves(query: torch.Tensor, value: torch.Tensor, dropout_p: float, *tensors: object) -> bool:
    """Whether :func:`cpu_flash_lse` serves this call exactly: CPU tensors, one head dim, no dropout, and no input
    that needs a gradient (its lse has none)."""
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    return query.device.type == "cpu" and query.shape[-1] == value.shape[-1] and not dropout_p and not needs_grad
