"""FlexAttention (torch.nn.attention.flex_attention), compiled.

Eager flex_attention is a slow reference implementation, so this backend always runs the compiled kernel
(Triton on CUDA, C++ on CPU). Causality becomes a BlockMask (cached per shape and device, so fully masked
blocks are skipped); other masks become a score_mod that adds the normalised mask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attnpatch.backends._define import define
from attnpatch.core import masks
from attnpatch.core.call import CallSpec
from attnpatch.core.capabilities import Capabilities


@functools.cache
def _compiled() -> Callable[..., Any]:
    return torch.compile(flex_attention)  # static first; automatic dynamic shapes on the first new shape


def _causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return q_idx >= kv_idx  # top-left aligned, like SDPA's is_causal


def _make_causal_block_mask(seq_q: int, seq_kv: int, device: str) -> Any:
    return create_block_mask(_causal, None, None, seq_q, seq_kv, device=device)


_causal_block_mask = functools.lru_cache(maxsize=64)(_make_causal_block_mask)


def flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """Compiled flex_attention on (batch, seq, heads, head_dim) tensors; see the module docstring."""
    if 0 in (query.shape[0], query.shape[1], key.shape[1]):
        # Nothing to compute, and flex's compiled kernel dies on it (seq_kv 0: "Floating point exception", which
        # kills the interpreter; batch 0 with a mask: IndexError). Rows with no key to attend are 0, as everywhere.
        return query.new_zeros((*query.shape[:3], value.shape[-1]))
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    batch, heads, seq_q, _ = q.shape
    seq_kv = k.shape[2]
    score_mod = None
    block_mask = None
    if attn_mask is not None:
        bias = masks.to_additive(attn_mask, torch.float32).expand(batch, heads, seq_q, seq_kv)

        def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return score + bias[b, h, q_idx, kv_idx]

    # Inside an outer torch.compile the caches below cannot be traced; the outer compile compiles flex anyway.
    compiling = torch.compiler.is_compiling()
    if attn_mask is None and is_causal:
        make: Callable[..., Any] = _make_causal_block_mask if compiling else _causal_block_mask
        block_mask = make(seq_q, seq_kv, str(q.device))
    kernel = cast(Callable[..., Any], flex_attention) if compiling else _compiled()
    out = kernel(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != heads)
    return masks.zero_fully_masked(out.transpose(1, 2), attn_mask)


def _device_reasons(call: CallSpec) -> list[str]:
    # Capabilities per device: torch has no FlexAttention backward on CPU ("FlexAttention does not support backward
    # on CPU", torch 2.13), so a CPU call that needs gradients goes elsewhere.
    if call.needs_grad and call.device_type == "cpu":
        return ["FlexAttention has no backward pass on CPU (inputs require grad)"]
    return []


define(
    "flex",
    flex,
    family="flex",
    caps=Capabilities(
        devices=frozenset({"cpu", "cuda", "xpu"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        min_head_dim=1,
        dropout=False,
        priority=5,
    ),
    check=lambda call: _device_reasons(call),
    description="torch FlexAttention, compiled (BlockMask for causal, score_mod for masks)",
    aliases=("flex_attn", "flex_attention", "flexattention"),
)
