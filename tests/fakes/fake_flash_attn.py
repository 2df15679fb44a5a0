"""FAKE ``flash_attn`` (FlashAttention-2): the documented 2.x signatures with reference math, on any device.

Installed as ``sys.modules["flash_attn"]`` by the tests; also what the fake ``kernels`` returns for
kernels-community/flash-attn2. Conventions kept from flash_attn/flash_attn_interface.py: q (batch, seqlen,
nheads, headdim), k/v with nheads_k dividing nheads, fp16/bf16, head dim <= 256, causal aligned bottom-right,
rows with nothing to attend give 0, varlen q/k/v are (total, nheads, headdim) with int32 cu_seqlens.
"""

from __future__ import annotations

import torch

from fakes.reference import attention, check_half, record

__version__ = "2.7.4"
calls: list[dict[str, object]] = []


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_half(q.contiguous(), k.contiguous(), v.contiguous())  # the real one makes inputs contiguous itself
    assert q.shape[-2] % k.shape[-2] == 0, "FAKE flash_attn: nheads must be divisible by nheads_k"
    assert q.shape[-1] <= 256, "FAKE flash_attn: FlashAttention only supports head dimension at most 256"
    assert q.shape[-1] == v.shape[-1], "FAKE flash_attn: v must have the head dim of q"


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """FAKE flash_attn_func: q (batch_size, seqlen, nheads, headdim) -> out of the same shape."""
    assert q.dim() == 4 and k.dim() == 4, "FAKE flash_attn_func: 4-D (batch, seqlen, nheads, headdim) inputs"
    _check(q, k, v)
    record(
        calls,
        "flash_attn_func",
        q=q,
        k=k,
        v=v,
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        deterministic=deterministic,
    )
    lse: list[torch.Tensor] = []
    out = attention(
        q,
        k,
        v,
        scale=softmax_scale,
        causal="bottom_right" if causal else None,
        dropout_p=dropout_p,
        softcap=softcap,
        window=None if tuple(window_size) == (-1, -1) else tuple(window_size),
        lse=lse,
    )
    if return_attn_probs:  # (out, softmax_lse (batch, nheads, seqlen_q) float32, S_dmask): S_dmask only with dropout
        return out, lse[0], None
    return out


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """FAKE flash_attn_varlen_func: q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim)."""
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
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        deterministic=deterministic,
        window_size=window_size,
        softcap=softcap,
    )
    out, lse = varlen(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        causal,
        dropout_p,
        "bottom_right",
        softcap=softcap,
        window=None if tuple(window_size) == (-1, -1) else tuple(window_size),
    )
    # softmax_lse of the varlen path: (nheads, total_q) float32 (flash_attn_interface.py _flash_attn_varlen_forward)
    return (out, lse, None) if return_attn_probs else out


def varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    causal,
    dropout_p,
    alignment,
    empty_rows="zero",
    softcap=0.0,
    window=None,
):
    """Reference varlen attention, sequence by sequence, checking what the real kernels rely on.

    Returns (out (total_q, nheads, headdim_v), lse (nheads, total_q) float32)."""
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "FAKE varlen: (total, nheads, headdim) inputs"
    _check(q, k, v)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.is_contiguous(), f"FAKE varlen: {name} int32 (b+1,)"
    assert cu_seqlens_q.shape == cu_seqlens_k.shape, "FAKE varlen: as many query as key sequences"
    assert int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0], "FAKE varlen: totals"
    lengths_q, lengths_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()
    assert int(lengths_q.max()) <= max_seqlen_q and int(lengths_k.max()) <= max_seqlen_k, "FAKE varlen: max_seqlen"
    outs, lses = [], []
    for b in range(cu_seqlens_q.numel() - 1):
        qs = q[int(cu_seqlens_q[b]) : int(cu_seqlens_q[b + 1])][None]
        ks = k[int(cu_seqlens_k[b]) : int(cu_seqlens_k[b + 1])][None]
        vs = v[int(cu_seqlens_k[b]) : int(cu_seqlens_k[b + 1])][None]
        causal_mode = alignment if causal else None
        lse: list[torch.Tensor] = []
        outs.append(
            attention(
                qs,
                ks,
                vs,
                scale=scale,
                causal=causal_mode,
                dropout_p=dropout_p,
                empty_rows=empty_rows,
                softcap=softcap,
                window=window,
                lse=lse,
            )[0]
        )
        lses.append(lse[0][0])
    return torch.cat(outs), torch.cat(lses, dim=1)
