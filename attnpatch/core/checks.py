"""Debug checks (ATTNPATCH_CHECKS=1 / ``set_checks(True)``): catch bad input with a message naming the tensor.

Free when off: the dispatcher calls :func:`run_checks` only while checks are on.
"""

from __future__ import annotations

import warnings

import torch

from attnpatch.core import masks
from attnpatch.core.call import dtype_name
from attnpatch.core.registry import Backend
from attnpatch.core.selection import Chain
from attnpatch.errors import AttnpatchWarning, CheckFailed


def run_checks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    chain: Chain,
) -> None:
    """Debug checks (ATTNPATCH_CHECKS=1 / set_checks(True)): raise CheckFailed naming tensor, value and rule."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise CheckFailed(f"{name} has shape {tuple(t.shape)}: must be 4-D (batch, seq, heads, head_dim)")
    for name, t in (("key", key), ("value", value)):
        if t.device != query.device:
            raise CheckFailed(f"{name} is on {t.device}, query on {query.device}: move them to one device")
        if t.dtype != query.dtype:
            raise CheckFailed(f"{name} is {t.dtype}, query {query.dtype}: q, k and v must share one dtype")
        if t.shape[0] != query.shape[0]:
            raise CheckFailed(f"{name} batch {t.shape[0]} != query batch {query.shape[0]}")
    if key.shape[1] != value.shape[1] or key.shape[2] != value.shape[2]:
        raise CheckFailed(
            f"key (seq {key.shape[1]}, heads {key.shape[2]}) and value (seq {value.shape[1]}, heads "
            f"{value.shape[2]}) must have the same seq_kv and heads"
        )
    if query.shape[2] % key.shape[2]:
        raise CheckFailed(
            f"query heads {query.shape[2]} is not a multiple of key/value heads {key.shape[2]} (GQA needs "
            "heads_q % heads_kv == 0)"
        )
    if query.shape[3] != key.shape[3]:
        raise CheckFailed(f"query head_dim {query.shape[3]} != key head_dim {key.shape[3]}")
    if attn_mask is not None:
        if attn_mask.device != query.device:
            raise CheckFailed(f"attn_mask is on {attn_mask.device}, query on {query.device}")
        if is_causal:
            raise CheckFailed(
                "attn_mask given together with is_causal=True: SDPA rejects this; attnpatch would apply both, "
                "which is rarely what a caller meant. Fold causality into the mask, or drop one of them"
            )
        masks.normalize(attn_mask, query, key)  # raises CheckFailed on a shape that does not broadcast
    for member in chain.members:
        if isinstance(member, Backend) and member.caps.dtypes is not None and query.dtype not in member.caps.dtypes:
            names = ", ".join(sorted(dtype_name(d) for d in member.caps.dtypes))
            warnings.warn(
                f"attnpatch checks: query dtype {dtype_name(query.dtype)} is not one backend "
                f"{member.name!r} runs ({names}); the call will fall back",
                AttnpatchWarning,
                stacklevel=4,
            )


def check_output(out: object, query: torch.Tensor, value: torch.Tensor, backend: str) -> None:
    """Debug check of a backend's result: (batch, seq_q, heads, head_dim_v), the query's dtype and device."""
    expected = (*query.shape[:3], value.shape[-1])
    if not isinstance(out, torch.Tensor):
        raise CheckFailed(f"backend {backend!r} returned {type(out).__name__}, not a tensor of shape {expected}")
    if tuple(out.shape) != expected:
        raise CheckFailed(
            f"backend {backend!r} returned shape {tuple(out.shape)}, expected {expected} (batch, seq_q, heads, "
            "head_dim_v): fix the backend's layout"
        )
    if out.dtype != query.dtype or out.device != query.device:
        raise CheckFailed(
            f"backend {backend!r} returned {out.dtype} on {out.device}, expected {query.dtype} on {query.device}"
        )
