"""Attention-mask normalisation, done once per call for every backend.

Accepted masks (True / non-zero = attend for bool and integer masks; additive masks are added to the scores):
    (batch|1, seq_kv)                    key padding, e.g. a tokenizer's attention_mask
    (batch|1, seq_q|1, seq_kv)           per-query mask
    (batch|1, 1|heads, seq_q|1, seq_kv)  SDPA-style 4-D mask, broadcast over the singleton dims
Out: a 4-D mask in one of the kinds of :mod:`attnpatch.core.call` (bool, key_padding, additive in query's dtype).
Note that a 2-D mask is *key padding* here, not SDPA's (seq_q, seq_kv): pass that one as (1, 1, seq_q, seq_kv).
"""

from __future__ import annotations

from typing import Any

import torch

from attnpatch.core.call import MASK_ADDITIVE, MASK_BOOL, MASK_KEY_PADDING, MASK_NONE
from attnpatch.errors import CheckFailed

# The last mask normalised and its result: a model passes one mask object to every layer of a forward, so the
# checks run once per forward, not once per layer. Kept only for results that are views of the mask (bool masks,
# additive ones in the query's dtype), which an in-place update of the mask cannot make stale.
_last: tuple[Any, ...] = (None, None, None, None, None)
# The last 2-D bool key-padding mask normalised, and its (batch|1, 1, 1, seq_kv) view: the dispatcher hands that
# view to torch's SDPA (native) when the same mask comes again, reading no shape (SDPA checks the shapes, and the
# dispatcher explains a refusal). Kept for seq_kv > 1 only: a (batch|1, 1) mask would broadcast over any keys.
padding: tuple[Any, Any] = (None, None)
# Bound once (torch.compile recognises the function itself). Dynamo is what must not read or keep the cache (a
# traced read guards on it); other tracing (non-strict export) never finds its fake tensors there and at worst leaves
# one in it until the next eager masked call.
_is_compiling = torch.compiler.is_dynamo_compiling


def normalize(
    mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor, bhsd: bool = False
) -> tuple[torch.Tensor, str]:
    """Return (mask (B|1, 1|H, Sq|1, Skv), kind) for query (B, Sq, H, D) and key (B, Skv, Hkv, D), or with
    ``bhsd`` for query (B, H, Sq, D) and key (B, Hkv, Skv, D) (SDPA's layout; the mask is the same either way).

    Runs on every masked call: the same mask as the last call is answered from a one-entry cache; otherwise shapes
    are read once, and singleton dims are added with ``view`` (a fraction of the cost of indexing with None).
    """
    global _last, padding
    query_shape, key_shape = query.shape, key.shape  # read once: each read of a tensor's shape costs ~0.1 us
    if _is_compiling():  # traced code must not read or keep a module-level tensor
        return _normalize(mask, query_shape, key_shape, query.dtype, bhsd)
    last = _last
    if mask is last[0] and query_shape == last[1] and key_shape == last[2] and bhsd is last[4]:
        return last[3]
    result = _normalize(mask, query_shape, key_shape, query.dtype, bhsd)
    if result[0] is mask or result[0]._base is mask:
        _last = (mask, query_shape, key_shape, result, bhsd)
        if result[1] == MASK_KEY_PADDING and mask.ndim == 2 and mask.shape[1] > 1:
            padding = (mask, result[0])
    return result


def explain(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor, bhsd: bool = False) -> None:
    """For a mask torch's SDPA refused when handed it as it is: raise the dispatcher's one-line
    :class:`~attnpatch.errors.CheckFailed` for it if it breaks the rules above (not chained to SDPA's error);
    return if it does not (the caller re-raises SDPA's)."""
    try:
        normalize(mask, query, key, bhsd)
    except CheckFailed as clear:
        raise clear from None


def _normalize(
    mask: torch.Tensor, query_shape: torch.Size, key_shape: torch.Size, dtype: torch.dtype, bhsd: bool
) -> tuple[torch.Tensor, str]:
    if not isinstance(mask, torch.Tensor):
        raise CheckFailed(
            f"attn_mask is a {type(mask).__name__}, not a tensor: pass a torch.Tensor (bool: True = attend, or "
            "additive float) of shape (batch, seq_kv), (batch, seq_q, seq_kv) or (batch, heads, seq_q, seq_kv)"
        )
    if bhsd:
        batch, heads, seq_q = query_shape[:3]
        seq_kv = key_shape[2]
    else:
        batch, seq_q, heads = query_shape[:3]
        seq_kv = key_shape[1]
    shape = mask.shape
    ndim = len(shape)
    mask_dtype = mask.dtype
    if mask_dtype != torch.bool and not mask_dtype.is_floating_point:
        mask, mask_dtype = mask != 0, torch.bool  # integer keep-masks (tokenizer attention_mask) mean the same
    if ndim == 4:
        b, h, q, k = shape
        if b not in (1, batch) or h not in (1, heads) or q not in (1, seq_q) or k != seq_kv:
            raise CheckFailed(
                f"attn_mask of shape {tuple(shape)}: a 4-D mask must broadcast to (batch={batch}, "
                f"heads={heads}, seq_q={seq_q}, seq_kv={seq_kv})"
            )
    elif ndim == 2:
        b = shape[0]
        if b not in (1, batch) or shape[1] != seq_kv:
            raise CheckFailed(
                f"attn_mask of shape {tuple(shape)}: a 2-D mask is key padding (batch={batch}|1, "
                f"seq_kv={seq_kv}); pass a (seq_q, seq_kv) mask as (1, 1, seq_q, seq_kv)"
            )
        h, q = 1, 1
        mask = mask.view(b, 1, 1, seq_kv)
    elif ndim == 3:
        b, q = shape[0], shape[1]
        if b not in (1, batch) or q not in (1, seq_q) or shape[2] != seq_kv:
            raise CheckFailed(
                f"attn_mask of shape {tuple(shape)}: a 3-D mask must be (batch={batch}|1, seq_q={seq_q}|1, "
                f"seq_kv={seq_kv})"
            )
        h = 1
        mask = mask.view(b, 1, q, seq_kv)
    else:
        raise CheckFailed(
            f"attn_mask with {ndim} dims, shape {tuple(shape)}: use (batch, seq_kv), "
            "(batch, seq_q, seq_kv) or (batch, heads, seq_q, seq_kv)"
        )
    if mask_dtype == torch.bool:
        return mask, (MASK_KEY_PADDING if h == 1 and q == 1 else MASK_BOOL)
    if mask_dtype != dtype:
        mask = mask.to(dtype)
    return mask, MASK_ADDITIVE


def causal(seq_q: int, seq_kv: int, device: torch.device) -> torch.Tensor:
    """Top-left aligned causal mask (seq_q, seq_kv), True = attend, like SDPA's is_causal."""
    return torch.ones(seq_q, seq_kv, dtype=torch.bool, device=device).tril()


def fold_causal(mask: torch.Tensor, kind: str, seq_q: int, seq_kv: int) -> tuple[torch.Tensor, str]:
    """Apply SDPA's top-left causal mask on top of ``mask`` so backends see one mask and is_causal=False."""
    keep = causal(seq_q, seq_kv, mask.device)
    if mask.dtype == torch.bool:
        return mask & keep, MASK_BOOL
    return mask.masked_fill(~keep, float("-inf")), MASK_ADDITIVE


def window(seq_q: int, seq_kv: int, left: int, right: int, device: torch.device) -> torch.Tensor:
    """Sliding-window mask (seq_q, seq_kv), True = attend: query i sees key j iff i - left <= j <= i + right, top-left
    aligned like :func:`causal` (query i sits at key position i); -1 = unbounded on that side."""
    rows = torch.arange(seq_q, device=device).unsqueeze(1)
    cols = torch.arange(seq_kv, device=device)
    keep = torch.ones(seq_q, seq_kv, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= cols >= rows - left
    if right >= 0:
        keep &= cols <= rows + right
    return keep


def fold_window(
    mask: torch.Tensor | None, window_size: tuple[int, int], seq_q: int, seq_kv: int, device: torch.device
) -> torch.Tensor:
    """``mask`` (normalised, or None) restricted to the sliding window ``window_size`` = (left, right): a bool mask
    (seq_q, seq_kv) -> (1, 1, seq_q, seq_kv) when there was none, else one of ``mask``'s kind."""
    keep = window(seq_q, seq_kv, *window_size, device)
    if mask is None:
        return keep.view(1, 1, seq_q, seq_kv)
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


def to_bool(mask: torch.Tensor) -> torch.Tensor:
    """True where a key may be attended (an additive mask's -inf entries are the masked ones)."""
    if mask.dtype == torch.bool:
        return mask
    return ~torch.isneginf(mask)


def to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def zero_fully_masked(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero query rows that may attend to no key at all (instead of NaN or an average of masked values).

    out: (batch, seq_q, heads, head_dim_v); mask: normalised (B|1, 1|H, Sq|1, Skv). No data-dependent branch,
    so it is safe inside torch.compile.
    """
    if mask is None:
        return out
    keep = to_bool(mask).any(dim=-1)  # (B|1, 1|H, Sq|1)
    keep = keep.transpose(1, 2).unsqueeze(-1)  # (B|1, Sq|1, 1|H, 1)
    return out.masked_fill(~keep, 0.0)


def kind_of(mask: torch.Tensor | None) -> str:
    if mask is None:
        return MASK_NONE
    if mask.dtype == torch.bool:
        return MASK_KEY_PADDING if mask.shape[1] == 1 and mask.shape[2] == 1 else MASK_BOOL
    return MASK_ADDITIVE
