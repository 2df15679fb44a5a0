"""``_native_xla``: the Pallas FlashAttention kernel of torch_xla (>= 2.2) on TPU.

From torch_xla/experimental/custom_kernel.py: ``flash_attention(q, k, v, causal=False, q_segment_ids=None,
kv_segment_ids=None, sm_scale=1.0, *, ab=None, ...)`` on (batch, heads, seq, head_dim) tensors with as many key
heads as query heads. Its ``sm_scale`` defaults to 1.0, not 1/sqrt(head_dim): diffusers pre-divides q by
sqrt(head_dim) and drops a caller's ``scale`` there, a silently wrong answer. Here the scale is always applied:
passed as ``sm_scale`` where the installed version has it, else folded into q (exact up to one rounding of q).
The Pallas kernel's causal mask is ``col <= row`` on absolute positions, i.e. top-left like SDPA. An autograd
Function with a backward; torch_xla makes it traceable itself, so it is called directly, without a custom op.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from attnpatch.backends import _probe
from attnpatch.backends._define import define
from attnpatch.core.call import MASK_NONE
from attnpatch.core.capabilities import Capabilities

XLA_VERSION = "2.2"
KERNEL_MODULE = "torch_xla.experimental.custom_kernel"


@functools.lru_cache(maxsize=8)
def _takes_sm_scale(flash_attention: Callable[..., Any]) -> bool:
    try:
        return "sm_scale" in inspect.signature(flash_attention).parameters
    except (TypeError, ValueError):
        return False


def native_xla(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """torch_xla flash_attention on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""
    flash_attention = _probe.lib(KERNEL_MODULE).flash_attention
    heads, heads_kv = query.shape[2], key.shape[2]
    if heads_kv != heads:  # the kernel wants one key head per query head
        key = key.repeat_interleave(heads // heads_kv, dim=2)
        value = value.repeat_interleave(heads // heads_kv, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    sm_scale = scale if scale is not None else query.shape[-1] ** -0.5
    if _takes_sm_scale(flash_attention):
        out = flash_attention(q, k, v, causal=is_causal, sm_scale=sm_scale)
    else:
        out = flash_attention(q * sm_scale, k, v, causal=is_causal)
    return out.transpose(1, 2)


define(
    "_native_xla",
    native_xla,
    family="xla",
    caps=Capabilities(
        devices=frozenset({"xla"}),
        dtypes=frozenset({torch.float32, torch.bfloat16}),
        masks=frozenset({MASK_NONE}),
        dropout=False,
        priority=50,  # on XLA devices the alternative is native SDPA (10)
    ),
    requires=_probe.requires("torch_xla", "torch-xla", XLA_VERSION, device=None),
    check=_probe.library_check(KERNEL_MODULE, replayed=False),  # called directly, not through the op
    description="torch_xla Pallas flash_attention (TPU); custom scale honoured, GQA by repeating key heads",
    aliases=("xla", "xla_flash", "native_xla"),
)
