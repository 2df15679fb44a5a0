"""The attention forms of transformers' flash and flex implementations, laid out as dispatcher calls.

transformers builds a different mask for each attention implementation (``masking_utils``), and each function
reads its own form:

- ``flash_attention_2/3/4`` and Hub flash kernels (``kernels-community/flash-attn2`` ..., registered with
  ``flash_attention_forward`` and the flash mask): no 4-D mask. ``attention_mask`` is None (no padding) or the
  2-D key-padding mask (batch, seq_kv'), seq_kv' <= seq_kv under a static cache; packed sequences come as
  ``cu_seq_lens_q/k`` or as ``position_ids`` that restart (batch 1). Causal masks and windows are aligned
  bottom-right within each sequence, as flash-attn's varlen kernels align them, and padded query rows give 0.
- ``flex_attention``: a ``BlockMask`` (its ``mask_mod`` evaluated per element, as flex does inside each
  partial block) or a 4-D additive tensor; ``softcap`` as a score_mod, ``s_aux`` renormalised through the lse.

Each form is turned into one dense mask (bool, (batch|1, 1|heads, seq_q, seq_kv)) plus the dispatcher's later
arguments (softcap, window, sinks), or into a reason to leave the call to transformers' own function.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from attnpatch.core import dispatch, selection
from attnpatch.patchers import sdpa, state
from attnpatch.patchers._layers import chain_of, mark_of, site_of

# A flex BlockMask is made dense for the dispatcher: beyond this many mask elements the call is left to flex
# (a 32k x 32k mask is 1 GiB of bools per batch row).
MAX_DENSE_MASK = 1 << 28

FLASH = "flash"
FLEX = "flex"
_FUNCTIONS = {
    FLASH: ("transformers.integrations.flash_attention", "flash_attention_forward"),
    FLEX: ("transformers.integrations.flex_attention", "flex_attention_forward"),
}
POSITIONAL = "extra positional arguments to the attention function: not a call shape attnpatch knows"
# Keywords of a flash call that update or read a paged KV cache inside the kernel (continuous batching).
_PAGED = ("block_table", "k_cache", "v_cache")


@dataclass
class Prepared:
    """One call in the dispatcher's terms. query (B, Sq, H, D), key/value (B, Skv, Hkv, D), mask as
    :func:`attnpatch.core.dispatch.route` takes it; ``shape``: the output's (B, Sq) when the call was flattened
    (packed sequences of a batch laid end to end)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    dropout: float
    causal: bool
    scale: float | None
    extra: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, int] | None = None


def form_of(fn: Any) -> str | None:
    """FLASH or FLEX when ``fn`` is transformers' own flash or flex attention function, else None."""
    for form, (module_name, name) in _FUNCTIONS.items():
        module = sys.modules.get(module_name)
        if module is not None and fn is getattr(module, name, None):
            return form
    return None


def prepare(form: str, module: Any, query: Any, key: Any, value: Any, mask: Any, kwargs: dict[str, Any]) -> Any:
    """The call of ``form``'s function as a :class:`Prepared`, or the reason (str) to run the function itself.

    query (B, H, Sq, D), key/value (B, Hkv, Skv, D), as transformers passes them.
    """
    if kwargs.get("head_mask") is not None:  # flash (4.x) drops it with a warning, flex (4.x) adds it to the scores
        return "head_mask given to a flash or flex attention function: left to transformers"
    if form == FLASH:
        return _flash(module, query, key, value, mask, kwargs)
    return _flex(module, query, key, value, mask, kwargs)


def router(original: Callable[..., Any], form: str, original_attr: str) -> Callable[..., Any]:
    """The router standing in for transformers' flash or flex function (``form``), whatever implementation name
    it was registered under (flash_attention_2, a Hub flash kernel, flex_attention); ``original_attr``: the
    attribute that names the function it stands in for.

    fn(module, query (B, H, Sq, D), key/value (B, Hkv, Skv, D), attention_mask, **kwargs) -> (out (B, Sq, H, Dv), None)
    """
    scope = selection.scope

    @functools.wraps(original)
    def attnpatch_attention(module: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        chosen = mark_of(module)
        if chosen is None and not state.route_all and scope.context is None:
            return original(module, query, key, value, *args, **kwargs)
        site = site_of(module)
        mask = args[0] if args else kwargs.get("attention_mask")
        if len(args) > 1:
            call: Prepared | str = (
                "extra positional arguments to the attention function: not a call shape attnpatch knows"
            )
        else:
            call = prepare(form, module, query, key, value, mask, kwargs)
        if isinstance(call, str):
            dispatch.note_passthrough(site, call)
            return original(module, query, key, value, *args, **kwargs)
        out = sdpa.route(
            call.query,
            call.key,
            call.value,
            call.mask,
            call.dropout,
            call.causal,
            call.scale,
            True,
            module_chain=chain_of(chosen),
            site=site,
            **call.extra,
        )
        if call.shape is not None:  # packed sequences laid end to end: back to (B, Sq, H, Dv)
            out = out.reshape(*call.shape, *out.shape[2:])
        return out, None

    setattr(attnpatch_attention, original_attr, original)
    return attnpatch_attention


def passthrough_router(original: Callable[..., Any], reason: str, original_attr: str) -> Callable[..., Any]:
    """A stand-in that always runs ``original``, counting each call on a selected layer with ``reason``, so the
    report says why a layer did not reach the chosen backend (custom or non-flash Hub kernels, eager functions
    that are more than softmax attention)."""
    scope = selection.scope

    @functools.wraps(original)
    def attnpatch_passthrough_attention(module: Any, *args: Any, **kwargs: Any) -> Any:
        if mark_of(module) is not None or state.route_all or scope.context is not None:
            dispatch.note_passthrough(site_of(module), reason)
        return original(module, *args, **kwargs)

    setattr(attnpatch_passthrough_attention, original_attr, original)
    return attnpatch_passthrough_attention


# ---------------------------------------------------------------------------------------------------- flash


def _flash(module: Any, query: Any, key: Any, value: Any, mask: Any, kwargs: dict[str, Any]) -> Prepared | str:
    if any(kwargs.get(name) is not None for name in _PAGED):
        return "a paged KV cache (block_table) is read and written inside transformers' flash kernel"
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        return "a flash attention function given a mask that is not 2-D key padding: left to transformers"
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    target = getattr(sys.modules.get(_FUNCTIONS[FLASH][0]), "get_target_dtype", None)
    dtype = target(query, module) if target is not None else None
    if dtype is not None and query.dtype == torch.float32:  # as fa_peft_integration_check casts before the kernel
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    extra: dict[str, Any] = {}
    if kwargs.get("softcap") is not None:
        extra["softcap"] = float(kwargs["softcap"])
    if kwargs.get("s_aux") is not None:
        extra["sinks"] = kwargs["s_aux"].to(query.dtype)  # as flash_attention_forward casts it
    window = kwargs.get("sliding_window")
    left = window - 1 if window is not None and key.shape[1] > window else -1
    right = 0 if causal else left
    call = Prepared(query, key, value, None, kwargs.get("dropout", 0.0), False, kwargs.get("scaling"), extra)
    batch, seq_q = query.shape[:2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    varlen = cu_q is not None and cu_k is not None
    varlen = varlen and kwargs.get("max_length_q") is not None and kwargs.get("max_length_k") is not None
    if mask is not None:
        return _padded(call, mask.bool(), causal, left, right)
    if varlen:
        return _segments(call, cu_q, cu_k, causal, left, right)
    position_ids: Any = kwargs.get("position_ids")
    if _is_packed(position_ids, batch):
        starts = (position_ids.reshape(-1) == position_ids.min()).nonzero().view(-1)
        cu = torch.cat([starts, starts.new_tensor([position_ids.numel()])])
        return _segments(call, cu, cu, causal, left, right)
    seq_kv = key.shape[1]
    if seq_q == seq_kv:  # top-left and bottom-right alignment agree
        call.causal = causal
        if left >= 0:
            call.extra["window"] = (left, right)
        return call
    if causal or left >= 0:
        rows = torch.arange(seq_q, device=query.device) + (seq_kv - seq_q)
        keep = _relative_keep(rows.unsqueeze(1), torch.arange(seq_kv, device=query.device), causal, left, right)
        call.mask = keep.view(1, 1, seq_q, seq_kv)
    return call


def _is_packed(position_ids: Any, batch: int) -> bool:
    # transformers' _is_packed_sequence: one row whose positions restart somewhere (reads the values: a sync).
    if not isinstance(position_ids, torch.Tensor) or batch != 1 or position_ids.shape[-1] == 1:
        return False
    increasing = torch.arange(position_ids.shape[-1], device=position_ids.device) + position_ids.min()
    return bool((increasing - position_ids.reshape(-1)).abs().sum())


def _padded(call: Prepared, padding: Any, causal: bool, left: int, right: int) -> Prepared:
    """flash's padding path (_upad_input): each row's real keys and queries packed together, the causal diagonal
    and the window aligned bottom-right on them. padding: (B, Skv') bool, True = real token."""
    seq_q = call.query.shape[1]
    seq_kv = padding.shape[1]
    if call.key.shape[1] > seq_kv:  # a static cache longer than the mask: flash reads only the mask's length
        call.key, call.value = call.key[:, :seq_kv], call.value[:, :seq_kv]
    if seq_q == seq_kv:
        real_q = padding
    elif seq_q == 1:
        real_q = torch.ones(padding.shape[0], 1, dtype=torch.bool, device=padding.device)
    else:
        real_q = padding[:, -seq_q:]  # flash assumes left padding here
    rank_k = padding.cumsum(-1) - 1
    rank_q = real_q.cumsum(-1) - 1 + (padding.sum(-1, keepdim=True) - real_q.sum(-1, keepdim=True))
    keep = _relative_keep(rank_q.unsqueeze(-1), rank_k.unsqueeze(-2), causal, left, right)
    keep &= real_q.unsqueeze(-1) & padding.unsqueeze(-2)
    call.mask = keep.unsqueeze(1)  # (B, 1, Sq, Skv)
    return call


def _segments(call: Prepared, cu_q: Any, cu_k: Any, causal: bool, left: int, right: int) -> Prepared:
    """flash's varlen path: the batch laid end to end, sequence i is queries cu_q[i]:cu_q[i+1] over keys
    cu_k[i]:cu_k[i+1], each aligned bottom-right; positions past the last sequence attend nothing."""
    batch, seq_q = call.query.shape[:2]
    flat = [t.reshape(1, -1, *t.shape[2:]) for t in (call.query, call.key, call.value)]
    call.query, call.key, call.value = flat
    call.shape = (batch, seq_q)
    device = call.query.device
    seg_q, pos_q, real_q = _segment_of(cu_q.to(device).long(), call.query.shape[1])
    seg_k, pos_k, real_k = _segment_of(cu_k.to(device).long(), call.key.shape[1])
    shift = (cu_k.to(device).long().diff() - cu_q.to(device).long().diff())[seg_q.clamp(max=len(cu_q) - 2)]
    keep = _relative_keep((pos_q + shift).unsqueeze(-1), pos_k.unsqueeze(0), causal, left, right)
    keep &= (seg_q.unsqueeze(-1) == seg_k.unsqueeze(0)) & real_q.unsqueeze(-1) & real_k.unsqueeze(0)
    call.mask = keep.view(1, 1, *keep.shape)
    return call


def _segment_of(cu: Any, length: int) -> tuple[Any, Any, Any]:
    # For each flattened position: its sequence, its position within it, whether it belongs to any sequence.
    positions = torch.arange(length, device=cu.device)
    segment = torch.searchsorted(cu, positions, right=True) - 1
    real = (segment >= 0) & (positions < cu[-1])
    segment = segment.clamp(min=0, max=len(cu) - 2)
    return segment, positions - cu[segment], real


def _relative_keep(query_pos: Any, key_pos: Any, causal: bool, left: int, right: int) -> Any:
    offset = key_pos - query_pos
    keep = torch.ones(offset.shape, dtype=torch.bool, device=offset.device)
    if causal:
        keep &= offset <= 0
    elif right >= 0:
        keep &= offset <= right
    if left >= 0:
        keep &= offset >= -left
    return keep


# ----------------------------------------------------------------------------------------------------- flex


def _flex(module: Any, query: Any, key: Any, value: Any, mask: Any, kwargs: dict[str, Any]) -> Prepared | str:
    if kwargs.get("dropout", 0.0) > 0:
        return "flex_attention with dropout > 0 (transformers refuses it itself)"
    seq_q, seq_kv = query.shape[2], key.shape[2]
    dense = None
    if mask is not None and not isinstance(mask, torch.Tensor):
        if type(mask).__name__ != "BlockMask":
            return f"a flex attention mask of type {type(mask).__name__}: left to transformers"
        dense = _dense_block_mask(mask, seq_q, seq_kv)
        if isinstance(dense, str):
            return dense
    elif mask is not None:
        if mask.dtype == torch.bool:
            return "a bool tensor mask given to flex_attention (it adds the mask to the scores): left to transformers"
        dense = mask[:, :1, :, :seq_kv]  # flex's score_mod adds score_mask[batch][0][q][kv]: head 0 for every head
    bias = kwargs.get("position_bias")
    if bias is not None:
        bias = bias[..., :seq_kv]
        if dense is not None and dense.dtype == torch.bool:
            dense = torch.zeros(dense.shape, dtype=query.dtype, device=query.device).masked_fill(~dense, float("-inf"))
        dense = bias if dense is None else dense + bias
    extra: dict[str, Any] = {}
    if kwargs.get("softcap") is not None:
        extra["softcap"] = float(kwargs["softcap"])
    if kwargs.get("s_aux") is not None:
        extra["sinks"] = kwargs["s_aux"]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    return Prepared(q, k, v, dense, 0.0, False, kwargs.get("scaling"), extra)


def _dense_block_mask(block_mask: Any, seq_q: int, seq_kv: int) -> Any:
    """A BlockMask as a bool tensor (B|1, H|1, Sq, Skv): blocks it lists (partial or full), and inside them the
    mask_mod, as flex applies it (transformers' masks list as full only blocks where mask_mod holds everywhere)."""
    batch, heads, q_len, kv_len = block_mask.shape
    if (q_len, kv_len) != (seq_q, seq_kv):
        return f"a flex BlockMask of {q_len}x{kv_len} for a {seq_q}x{seq_kv} call: left to transformers"
    if batch * heads * q_len * kv_len > MAX_DENSE_MASK:
        return (
            f"a flex BlockMask of {batch}x{heads}x{q_len}x{kv_len} is too large to hand to another backend as a "
            "dense mask: left to flex"
        )
    if torch.compiler.is_compiling():
        return "a flex BlockMask inside a compiled region (made dense only in eager code): left to transformers"
    from torch.nn.attention.flex_attention import create_mask

    device = block_mask.kv_indices.device
    keep = create_mask(block_mask.mask_mod, batch, heads, q_len, kv_len, device)
    q_block, kv_block = block_mask.BLOCK_SIZE
    blocks = block_mask.to_dense().bool()
    blocks = blocks.repeat_interleave(q_block, dim=2)[:, :, :q_len].repeat_interleave(kv_block, dim=3)
    return keep & blocks[:, :, :, :kv_len]
