"""xFormers ``memory_efficient_attention`` (xformers >= 0.0.29), every mask kind as an ``attn_bias``.

From xformers/ops/fmha/__init__.py and common.py:

- Inputs are ``[B, M, H, K]`` (the dispatcher's layout) with stride 1 in the last dim. GQA/MQA is the 5-D
  ``[B, M, G, H, K]`` form with key/value expanded (stride 0) over H, which costs no copy.
- ``attn_bias``: ``LowerTriangularMask()`` is causal aligned top-left ("a query Q cannot attend to a key which is
  farther from the initial key than Q is from the initial query"), like SDPA, also when M_q != M_kv. Any other mask
  is a tensor bias of the query's dtype, shape ``[B, H, Mq, Mkv]`` (``[B, G, H, Mq, Mkv]`` for GQA), which may be
  expanded, but whose strides must be multiples of 8 (16 bytes): "To use an `attn_bias` with a sequence length that
  is not a multiple of 8, you need to ensure memory is aligned by slicing a bigger tensor". So the bias is built in
  storage padded to a multiple of 8 keys and sliced.
- ``p`` (dropout), ``scale``, a backward pass; "This operator may be nondeterministic".
- f16, bf16 and f32 on NVIDIA GPUs; bf16 only on sm80+ (its ``supports()`` rejects it below).
A query row whose keys are all masked comes out of the kernel as NaN; it is set to 0 here like everywhere else.
"""

from __future__ import annotations

import torch

from attnpatch.backends import _probe
from attnpatch.backends._define import define
from attnpatch.core import masks
from attnpatch.core.call import ALL_MASKS, CallSpec
from attnpatch.core.capabilities import Capabilities

XFORMERS_VERSION = "0.0.29"
ALIGNMENT = 8  # keys; 16 bytes of fp16/bf16 (fp32 needs 4, which 8 satisfies)


def xformers_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """memory_efficient_attention on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""
    ops = _probe.lib("xformers.ops")
    heads, heads_kv = query.shape[2], key.shape[2]
    query, key, value = (_probe.last_dim_contiguous(t) for t in (query, key, value))
    groups = heads_kv if heads_kv != heads else None
    if groups is not None:
        per_group = heads // heads_kv
        query = query.unflatten(2, (heads_kv, per_group))
        key = key.unsqueeze(3).expand(-1, -1, -1, per_group, -1)
        value = value.unsqueeze(3).expand(-1, -1, -1, per_group, -1)
    bias: object = None
    if is_causal:
        bias = ops.LowerTriangularMask()
    elif attn_mask is not None:
        bias = aligned_bias(attn_mask, query.dtype, query.shape[0], heads, query.shape[1], key.shape[1], groups)
    out = ops.memory_efficient_attention(query, key, value, attn_bias=bias, p=dropout_p, scale=scale)
    if groups is not None:
        out = out.flatten(2, 3)
    return masks.zero_fully_masked(out, attn_mask)


def aligned_bias(
    attn_mask: torch.Tensor,
    dtype: torch.dtype,
    batch: int,
    heads: int,
    seq_q: int,
    seq_kv: int,
    groups: int | None,
) -> torch.Tensor:
    """The normalised mask (batch|1, 1|heads, seq_q|1, seq_kv) as an xFormers tensor bias.

    Stored once at its own (broadcast) size in a buffer whose last dim is padded to a multiple of 8, then sliced
    and expanded to (batch, heads, seq_q, seq_kv), or (batch, groups, heads // groups, seq_q, seq_kv) for GQA.
    Expanded dims have stride 0, which satisfies the alignment rule.
    """
    b, h, q, _ = attn_mask.shape
    padded = -(-seq_kv // ALIGNMENT) * ALIGNMENT
    bias = torch.empty((b, h, q, padded), dtype=dtype, device=attn_mask.device)[..., :seq_kv]
    bias.copy_(masks.to_additive(attn_mask, dtype))
    bias = bias.expand(batch, heads, seq_q, seq_kv)
    return bias if groups is None else bias.unflatten(1, (groups, heads // groups))


def _bfloat16_needs_sm80(call: CallSpec) -> list[str]:
    if call.dtype == torch.bfloat16 and call.device_type == "cuda":
        cc = _probe.compute_capability(call.device_index)
        if cc < (8, 0):
            return [f"xformers runs bfloat16 on compute capability >= 8.0 only, found {cc[0]}.{cc[1]}"]
    return []


define(
    "xformers",
    xformers_kernel,
    family="xformers",
    caps=Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        masks=ALL_MASKS,
        deterministic=False,
        priority=35,
    ),
    requires=_probe.requires("xformers", "xformers", XFORMERS_VERSION),
    check=_probe.library_check("xformers.ops", _bfloat16_needs_sm80),
    description="xformers.ops.memory_efficient_attention; every mask as an aligned attn_bias",
    kernel=True,
    aliases=("xformers_attn", "mem_efficient_xformers"),
)
