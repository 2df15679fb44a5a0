"""FAKE ``xformers`` / ``xformers.ops``: ``memory_efficient_attention`` with reference math and the real checks.

Installed as both ``sys.modules["xformers"]`` and ``sys.modules["xformers.ops"]``. Kept from
xformers/ops/fmha (__init__.py, common.py, attn_bias.py, cutlass.py):
- inputs [B, M, H, K], or [B, M, G, H, K] for grouped heads, last dim contiguous; f16/bf16/f32;
- ``LowerTriangularMask()``: causal aligned top-left;
- a tensor ``attn_bias`` must have exactly the attention shape (it may be expanded), the query's dtype, and
  every stride but the last a multiple of 16 bytes (``_check_bias_alignment``, with its padding HINT);
- a row whose bias is -inf everywhere comes out as NaN (nothing to normalise by).
"""

from __future__ import annotations

import torch

from fakes.reference import attention, check_half, record

__version__ = "0.0.29.post1"
calls: list[dict[str, object]] = []


class LowerTriangularMask:
    """A lower triangular (causal) mask: query i attends keys 0..i, counted from the top-left corner."""


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None, output_dtype=None):
    """FAKE xformers.ops.memory_efficient_attention: query [B, Mq, (G,) H, K] -> [B, Mq, (G,) H, Kv]."""
    assert query.dim() in (4, 5), f"FAKE xformers: invalid shape for query: {tuple(query.shape)}"
    check_half(query, key, value, allowed=(torch.float16, torch.bfloat16, torch.float32))
    grouped = query.dim() == 5
    expected_bias = (
        (query.shape[0], query.shape[2], query.shape[3], query.shape[1], key.shape[1])
        if grouped
        else (query.shape[0], query.shape[2], query.shape[1], key.shape[1])
    )
    causal = None
    bias = None
    if isinstance(attn_bias, LowerTriangularMask):
        causal = "top_left"
    elif isinstance(attn_bias, torch.Tensor):
        assert tuple(attn_bias.shape) == expected_bias, (
            f"FAKE xformers: attn_bias {tuple(attn_bias.shape)} != {expected_bias}"
        )
        assert attn_bias.dtype == query.dtype, "FAKE xformers: attn_bias must have the query's dtype"
        alignment = 128 // torch.finfo(attn_bias.dtype).bits
        for d in range(attn_bias.dim() - 1):
            if attn_bias.stride(d) % alignment:
                raise ValueError(
                    f"attn_bias.stride(-2) % {alignment} != 0 (attn_bias.stride() = {attn_bias.stride()})\n"
                    "HINT: To use an `attn_bias` with a sequence length that is not a multiple of 8, you need to "
                    "ensure memory is aligned by slicing a bigger tensor."
                )
        assert attn_bias.stride(-1) <= 1, "FAKE xformers: attn_bias.stride(-1) > 1"
        bias = attn_bias
    else:
        assert attn_bias is None, f"FAKE xformers: unsupported attn_bias {type(attn_bias).__name__}"
    record(
        calls,
        "memory_efficient_attention",
        query=query,
        key=key,
        value=value,
        p=p,
        scale=scale,
        attn_bias=attn_bias if isinstance(attn_bias, torch.Tensor) else type(attn_bias).__name__,
    )
    if grouped:
        batch, seq_q, groups, heads, _ = query.shape
        query, key, value = (
            t.reshape(t.shape[0], t.shape[1], groups * heads, t.shape[-1]) for t in (query, key, value)
        )
        if bias is not None:
            bias = bias.reshape(batch, groups * heads, seq_q, bias.shape[-1])
    out = attention(query, key, value, scale=scale, causal=causal, bias=bias, dropout_p=p, empty_rows="nan")
    return out.unflatten(2, (groups, heads)) if grouped else out
