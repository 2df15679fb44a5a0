"""Attention written out in torch operations, for the later arguments no fused torch kernel takes.

:func:`attention` computes softmax(softcap(scale * q.k) + mask) @ v in float32 (float64 for float64 inputs) with
every later argument of the dispatcher (softcap, window, sinks, return_lse): the reference ``_native_math`` serves
them with, and the path ``native`` takes for the arguments SDPA has no parameter for. It is differentiable in
every input, the sinks and the returned lse included, and gives 0 (lse -inf) for query rows with no key to attend,
with finite gradients there.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from attnpatch.core import masks
from attnpatch.core.call import SdpaArgs

if TYPE_CHECKING:
    from typing_extensions import Unpack


def attention(
    *args: Unpack[SdpaArgs],
    softcap: float | None = None,
    window: tuple[int, int] | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention in plain torch operations, with the dispatcher's conventions (attnpatch/core/call.py).

    query: (batch, seq_q, heads, head_dim); key: (batch, seq_kv, heads_kv, head_dim); value: (batch, seq_kv,
    heads_kv, head_dim_v); attn_mask normalised (B|1, 1|H, Sq|1, Skv); sinks: (heads,).
    Returns out (batch, seq_q, heads, head_dim_v) in query's dtype, and with ``return_lse`` also
    lse (batch, seq_q, heads) float32, the natural-log log-sum-exp of the scaled, capped, masked logits.
    """
    query, key, value, attn_mask, dropout_p, is_causal, scale, _ = args
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = (t.transpose(1, 2).to(compute) for t in (query, key, value))  # (B, H, S, D)
    heads, heads_kv = q.shape[1], k.shape[1]
    if heads_kv != heads:
        k = k.repeat_interleave(heads // heads_kv, dim=1)
        v = v.repeat_interleave(heads // heads_kv, dim=1)
    seq_q, seq_kv = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(compute)
    if is_causal:
        scores = scores.masked_fill(~masks.causal(seq_q, seq_kv, scores.device), float("-inf"))
    if window is not None:
        scores = scores.masked_fill(~masks.window(seq_q, seq_kv, *window, scores.device), float("-inf"))
    # A softmax that leaves rows with no key at 0 (and lse at -inf) with finite gradients: the row maximum is a
    # constant to autograd and 0 where the row has none; the log of an empty sum is taken of a clamped value and
    # then replaced, so no inf or NaN reaches the backward.
    peak = scores.amax(dim=-1, keepdim=True).detach()
    peak = peak.masked_fill(torch.isneginf(peak), 0.0)
    weights = torch.exp(scores - peak)
    total = weights.sum(dim=-1, keepdim=True)
    attended = total > 0
    lse = torch.where(attended, torch.log(total.clamp_min(torch.finfo(compute).tiny)) + peak, float("-inf"))
    probs = weights / total.clamp_min(torch.finfo(compute).tiny)
    if sinks is not None:
        # The sink joins the denominator: p_sink = p * exp(lse) / (exp(lse) + exp(sink)) = p * sigmoid(lse - sink).
        probs = probs * torch.sigmoid(lse - sinks.to(compute).view(1, heads, 1, 1))
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = (probs @ v).transpose(1, 2).to(query.dtype)
    if return_lse:
        return out, lse.squeeze(-1).transpose(1, 2).to(torch.float32)
    return out
