"""Reference attention math for the fakes: float64, the fakes' own layouts and conventions.

Each fake library calls :func:`attention` with the conventions of the real library it stands in for (causal
alignment, what happens to a row with no key), so an adapter that maps arguments wrongly gets a different answer.
The tests compare against torch's SDPA in float64, an independent implementation.
"""

from __future__ import annotations

import torch


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: str | None = None,
    keep: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    empty_rows: str = "zero",
    softcap: float = 0.0,
    window: tuple[int | None, int | None] | None = None,
    lse: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Softmax attention computed in float64, returned in q's dtype.

    q: (batch, seq_q, heads, head_dim); k: (batch, seq_kv, heads_kv, head_dim); v: (batch, seq_kv, heads_kv,
    head_dim_v) with heads_kv dividing heads (query head h reads key head h // (heads // heads_kv)).
    causal: None, "top_left" (SDPA, xFormers) or "bottom_right" (FlashAttention, AITER).
    keep: bool broadcastable to (batch, heads, seq_q, seq_kv), True = attend. bias: additive, same broadcast.
    empty_rows: "zero" (FlashAttention: "If the row of the mask is all zero, the output will be zero") or "nan"
    (a softmax over nothing).
    softcap: > 0 caps the scaled scores, softcap * tanh(s / softcap), before masks (flash-attn 2.6+, FA3, FA4).
    window: (left, right), -1 or None unbounded, aligned like ``causal`` (bottom-right unless causal="top_left"):
    query i sees key j iff i + offset - left <= j <= i + offset + right (flash_attn_interface.py docstring).
    lse: a list that receives the float32 log-sum-exp (batch, heads, seq_q) of the capped, masked scores, +inf for
    a row with no key (flash-attn's csrc/flash_attn/src/softmax.h writes INFINITY there outside split-KV).
    """
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    repeat = qd.shape[1] // kd.shape[1]
    kd, vd = kd.repeat_interleave(repeat, dim=1), vd.repeat_interleave(repeat, dim=1)
    scores = qd @ kd.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    seq_q, seq_kv = scores.shape[-2], scores.shape[-1]
    allowed = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if keep is not None:
        allowed = allowed & keep
    if causal is not None:
        offset = 0 if causal == "top_left" else seq_kv - seq_q
        rows = torch.arange(seq_q, device=scores.device)[:, None]
        cols = torch.arange(seq_kv, device=scores.device)[None, :]
        allowed = allowed & (cols <= rows + offset)
    if window is not None:
        offset = 0 if causal == "top_left" else seq_kv - seq_q
        rows = torch.arange(seq_q, device=scores.device)[:, None] + offset
        cols = torch.arange(seq_kv, device=scores.device)[None, :]
        left, right = (-1 if side is None else side for side in window)
        if left >= 0:
            allowed = allowed & (cols >= rows - left)
        if right >= 0:
            allowed = allowed & (cols <= rows + right)
    if bias is not None:
        scores = scores + bias.double()
    scores = scores.masked_fill(~allowed, float("-inf"))
    if lse is not None:
        row_lse = torch.logsumexp(scores, dim=-1)
        lse.append(row_lse.masked_fill(torch.isneginf(row_lse), float("inf")).float())
    probs = torch.softmax(scores, dim=-1)
    if empty_rows == "zero":
        probs = probs.nan_to_num(0.0)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    out = probs @ vd
    if empty_rows == "nan":  # also when there is no key at all (an empty sequence), where softmax has no row
        out = out.masked_fill(~allowed.any(dim=-1, keepdim=True), float("nan"))
    return out.transpose(1, 2).to(q.dtype)


def record(calls: list[dict[str, object]], function: str, **arguments: object) -> None:
    """Log a call: tensors as (shape, dtype, stride), everything else as given."""
    logged: dict[str, object] = {"function": function}
    for name, value in arguments.items():
        if isinstance(value, torch.Tensor):
            logged[name] = (tuple(value.shape), value.dtype, tuple(value.stride()))
            logged[name + "_value"] = value.detach().clone()
        else:
            logged[name] = value
    calls.append(logged)


def check_half(*tensors: torch.Tensor, allowed: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)) -> None:
    for t in tensors:
        assert t.dtype in allowed, f"FAKE: dtype {t.dtype} not in {allowed} (the real kernel asserts this)"
        assert t.stride(-1) == 1, "FAKE: the last dim must be contiguous (the real kernel asserts this)"
