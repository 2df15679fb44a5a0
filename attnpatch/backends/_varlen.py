"""Key-padding masks as packed sequences, for the varlen kernels (flash, FlashAttention-3, SageAttention).

Queries are never packed: every query row is computed, as SDPA does with a key-padding mask. Keys and values of
the attended positions are packed with ``cu_seqlens``, without ``.item()`` (max_seqlen_k is the padded length, an
upper bound, so compiled regions need no device-to-host sync).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from attnpatch.core import masks


def cu_seqlens(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """(batch + 1,) int32 offsets of ``batch`` sequences of ``seq`` tokens each."""
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seq


def pack_keys(
    key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values of the attended positions only, for a varlen kernel.

    key: (batch, seq_kv, heads_kv, head_dim); attn_mask: None or a key-padding mask (batch|1, 1, 1, seq_kv), bool,
    True = attend, at any positions (left padding included). Returns key (total_k, heads_kv, head_dim), value
    (total_k, heads_kv, head_dim_v) and cu_seqlens_k (batch + 1,) int32. The caller passes seq_kv as max_seqlen_k:
    an upper bound is what the kernels need, and the true maximum would cost a device-to-host sync.
    """
    batch, seq_kv = key.shape[0], key.shape[1]
    if attn_mask is None:
        return key.flatten(0, 1), value.flatten(0, 1), cu_seqlens(batch, seq_kv, key.device)
    keep = attn_mask.reshape(attn_mask.shape[0], seq_kv).expand(batch, seq_kv)
    # An entry with no key to attend keeps its first key: no kernel then sees an empty sequence (flash-attn's
    # reference path raises IndexError on one, the CUDA kernel writes 0), and varlen_output zeroes its rows anyway.
    keep = keep | ((torch.arange(seq_kv, device=keep.device) == 0) & ~keep.any(dim=1, keepdim=True))
    counts = keep.sum(dim=1, dtype=torch.int32)
    offsets = torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
    index = keep.flatten().nonzero().squeeze(1)
    return key.flatten(0, 1).index_select(0, index), value.flatten(0, 1).index_select(0, index), offsets


def varlen_output(out: torch.Tensor, batch: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch * seq_q, heads, head_dim_v) from a varlen kernel -> (batch, seq_q, heads, head_dim_v).

    Queries are never packed (every query row is computed, as SDPA does with a key-padding mask), so this is a
    reshape; a batch entry with no key to attend gets 0, whatever the kernel wrote for it.
    """
    return masks.zero_fully_masked(out.unflatten(0, (batch, -1)), attn_mask)


def run_varlen(
    kernel: Callable[..., Any],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    *,
    copy_key: bool = False,
    lse: bool = False,
    lse_rows_first: bool = False,
    **kwargs: Any,
) -> Any:
    """``kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)`` on packed keys.

    query: (batch, seq_q, heads, head_dim); key/value: (batch, seq_kv, heads_kv, head_dim[_v]); attn_mask: None
    or a key-padding mask (batch|1, 1, 1, seq_kv). Returns (batch, seq_q, heads, head_dim_v); a batch entry with no
    key to attend gets 0. ``copy_key``: for kernels that modify the key in place (without a mask, packing is a
    view of the caller's key). A kernel that returns ``(out, lse, ...)`` has its output taken; with ``lse`` (the
    caller asked the kernel for it) the result is (out, lse (batch, seq_q, heads) float32) from the kernel's
    (heads, total_q) lse (``lse_rows_first``: (total_q, heads), as flash-attn 2.8.3's ROCm Triton backend returns
    it), -inf for an entry with no key.
    """
    batch, seq_q = query.shape[0], query.shape[1]
    packed_key, packed_value, cu_seqlens_k = pack_keys(key, value, attn_mask)
    if copy_key:
        packed_key = packed_key.clone()
    out = kernel(
        query.flatten(0, 1),
        packed_key,
        packed_value,
        cu_seqlens(batch, seq_q, query.device),
        cu_seqlens_k,
        seq_q,
        key.shape[1],
        **kwargs,
    )
    result = varlen_output(out[0] if isinstance(out, tuple) else out, batch, attn_mask)
    if not lse:
        return result
    heads = query.shape[2]
    packed_lse = out[1].transpose(0, 1) if lse_rows_first else out[1]
    if packed_lse.shape != (heads, batch * seq_q):
        raise RuntimeError(
            f"varlen kernel returned an lse of shape {tuple(out[1].shape)}, expected (heads={heads}, "
            f"total_q={batch * seq_q}){' transposed' if lse_rows_first else ''}: its layout changed; report it"
        )
    packed_lse = packed_lse.view(heads, batch, seq_q).permute(1, 2, 0)  # every query row is kept: a reshape
    empty = None
    if attn_mask is not None:
        empty = ~masks.to_bool(attn_mask).flatten(1).any(dim=1).view(-1, 1, 1)  # (batch|1, 1, 1)
    return result, _lse(packed_lse, empty)


def _lse(lse: torch.Tensor, empty: torch.Tensor | None) -> torch.Tensor:
    # float32, -inf on rows with no key (flash-attn writes +inf there, or an lse over the one key kept for them)
    lse = lse.to(torch.float32)
    lse = lse.masked_fill(lse == float("inf"), float("-inf"))
    return lse if empty is None else lse.masked_fill(empty, float("-inf"))
