"""FAKE ``flash_attn_interface`` (FlashAttention-3, hopper/): documented signatures, reference math.

Installed as ``sys.modules["flash_attn_interface"]``; also the fake Hub build kernels-community/flash-attn3.
Kept from hopper/flash_attn_interface.py: no dropout argument, head dim a multiple of 8 up to 256, fp16/bf16,
causal aligned bottom-right, ``flash_attn_func`` returns ``out`` (``(out, softmax_lse)`` when ``BETA`` is set, as
the beta release did).
"""

from __future__ import annotations

import torch

from fakes import fake_flash_attn
from fakes.reference import attention, record

__version__ = "3.0.0b1"
BETA = False
calls: list[dict[str, object]] = []


def _check(q: torch.Tensor) -> None:
    assert q.shape[-1] % 8 == 0, "FAKE flash_attn_interface: head_size should be a multiple of 8"


def flash_attn_func(
    q,
    k,
    v,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
):
    """FAKE FA3 flash_attn_func: q (batch_size, seqlen, nheads, headdim)."""
    _check(q)
    fake_flash_attn._check(q, k, v)
    record(
        calls,
        "flash_attn_func",
        q=q,
        k=k,
        v=v,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        deterministic=deterministic,
    )
    lse: list[torch.Tensor] = []
    window = None if tuple(window_size) == (-1, -1) else tuple(window_size)
    out = attention(
        q, k, v, scale=softmax_scale, causal="bottom_right" if causal else None, softcap=softcap, window=window, lse=lse
    )
    return (out, lse[0]) if (BETA or return_attn_probs) else out  # softmax_lse (batch, nheads, seqlen_q)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    seqused_q=None,
    seqused_k=None,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
):
    """FAKE FA3 flash_attn_varlen_func: q (total_q, nheads, headdim)."""
    _check(q)
    record(
        calls,
        "flash_attn_varlen_func",
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
    )
    window = None if tuple(window_size) == (-1, -1) else tuple(window_size)
    out, lse = fake_flash_attn.varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, 0.0, "bottom_right",
        softcap=softcap, window=window,
    )  # fmt: skip
    return (out, lse) if (BETA or return_attn_probs) else out  # softmax_lse (nheads, total_q)
