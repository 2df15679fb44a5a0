"""Float64 reference attention, written out with no SDPA, for comparing every backend against."""

from __future__ import annotations

import math

import torch


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention in float64. query (B, Sq, H, D), key/value (B, Skv, Hkv, D|Dv) -> (B, Sq, H, Dv).

    attn_mask: bool/int keep-mask or additive float, in any layout the dispatcher accepts (2-D = key padding).
    is_causal: top-left aligned. Query rows that can attend to no key give 0.
    """
    q, k, v = (t.double().transpose(1, 2) for t in (query, key, value))  # (B, H, S, D)
    batch, heads, seq_q, dim = q.shape
    seq_kv = k.shape[2]
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(dim))
    bias = torch.zeros(batch, heads, seq_q, seq_kv, dtype=torch.float64)
    if attn_mask is not None:
        m = attn_mask
        if m.dim() == 2:
            m = m[:, None, None, :]
        elif m.dim() == 3:
            m = m[:, None]
        if m.dtype == torch.bool or not m.is_floating_point():
            bias = bias.masked_fill(~(m != 0), float("-inf"))
        else:
            bias = bias + m.double()
    if is_causal:
        keep = torch.ones(seq_q, seq_kv, dtype=torch.bool).tril()
        bias = bias.masked_fill(~keep, float("-inf"))
    scores = scores + bias
    row_ok = (scores > float("-inf")).any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~row_ok, 0.0), dim=-1).masked_fill(~row_ok, 0.0)
    return (probs @ v).transpose(1, 2)
