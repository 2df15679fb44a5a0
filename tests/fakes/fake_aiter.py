"""FAKE ``aiter`` (AMD AITER): ``flash_attn_func`` of aiter/ops/mha.py with reference math.

Installed as ``sys.modules["aiter"]``; also the fake Hub build kernels-community/aiter-flash-attn-ck. Kept from the
real one: the FlashAttention-2 layout and conventions (causal aligned bottom-right, fp16/bf16, nheads_k dividing
nheads), ``deterministic=True`` by default, and a tuple result even when only ``out`` is asked for.
"""

from __future__ import annotations

from fakes import fake_flash_attn
from fakes.reference import attention, record

__version__ = "0.1.5"
calls: list[dict[str, object]] = []


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    bias=None,
    alibi_slopes=None,
    deterministic=True,
    return_lse=False,
    return_attn_probs=False,
):
    """FAKE aiter.flash_attn_func: q (batch_size, seqlen, nheads, headdim) -> (out, [lse]) tuple."""
    fake_flash_attn._check(q, k, v)
    record(
        calls,
        "flash_attn_func",
        q=q,
        k=k,
        v=v,
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        deterministic=deterministic,
    )
    out = attention(q, k, v, scale=softmax_scale, causal="bottom_right" if causal else None, dropout_p=dropout_p)
    return (out,)
