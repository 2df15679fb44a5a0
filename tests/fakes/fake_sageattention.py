"""FAKE ``sageattention`` 2.x: the documented signatures of sageattention/core.py with exact (unquantised) math.

Installed as ``sys.modules["sageattention"]``; also the fake Hub build SageAttention/sage-attention. Kept from
the real one: ``tensor_layout`` "HND" (default) or "NHD", fp16/bf16, head dim <= 128, num_qo_heads a multiple of
num_kv_heads, ``is_causal`` only with qo_len == kv_len, and ``**kwargs`` swallowing anything else without a word
(an ``attn_mask`` passed here would be ignored: ``calls`` records it so a test can prove none is passed).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fakes import fake_flash_attn
from fakes.reference import attention, check_half, record

__version__ = "2.2.0"
calls: list[dict[str, object]] = []
core = SimpleNamespace(SM80_ENABLED=True, SM89_ENABLED=True, SM90_ENABLED=True)


def _run(function, q, k, v, tensor_layout, is_causal, sm_scale, kwargs):
    assert tensor_layout in ("HND", "NHD"), f"FAKE sageattention: unknown tensor_layout {tensor_layout!r}"
    check_half(q, k, v)
    if q.shape[-1] > 128:
        raise ValueError(f"Unsupported head_dim: {q.shape[-1]}")
    if tensor_layout == "HND":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    assert q.shape[2] % k.shape[2] == 0, "FAKE sageattention: num_qo_heads must be divisible by num_kv_heads"
    if is_causal:
        assert q.shape[1] == k.shape[1], "FAKE sageattention: is_causal is only applicable when qo_len == kv_len"
    record(
        calls,
        function,
        q=q,
        k=k,
        v=v,
        tensor_layout=tensor_layout,
        is_causal=is_causal,
        sm_scale=sm_scale,
        kwargs=dict(kwargs),
    )
    out = attention(q, k, v, scale=sm_scale, causal="top_left" if is_causal else None)
    return out.transpose(1, 2) if tensor_layout == "HND" else out


def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs):
    """FAKE sageattn: picks a kernel by compute capability in the real one."""
    return _run("sageattn", q, k, v, tensor_layout, is_causal, sm_scale, kwargs)


def sageattn_qk_int8_pv_fp16_triton(
    q,
    k,
    v,
    tensor_layout="HND",
    quantization_backend="triton",
    is_causal=False,
    sm_scale=None,
    smooth_k=True,
    return_lse=False,
    **kwargs,
):
    return _run("sageattn_qk_int8_pv_fp16_triton", q, k, v, tensor_layout, is_causal, sm_scale, kwargs)


def sageattn_qk_int8_pv_fp16_cuda(
    q,
    k,
    v,
    tensor_layout="HND",
    is_causal=False,
    qk_quant_gran="per_thread",
    sm_scale=None,
    pv_accum_dtype="fp32",
    smooth_k=True,
    smooth_v=False,
    return_lse=False,
    **kwargs,
):
    return _run(
        "sageattn_qk_int8_pv_fp16_cuda",
        q,
        k,
        v,
        tensor_layout,
        is_causal,
        sm_scale,
        {**kwargs, "qk_quant_gran": qk_quant_gran},
    )


def sageattn_qk_int8_pv_fp8_cuda(
    q,
    k,
    v,
    tensor_layout="HND",
    is_causal=False,
    qk_quant_gran="per_thread",
    sm_scale=None,
    pv_accum_dtype="fp32+fp16",
    smooth_k=True,
    smooth_v=False,
    return_lse=False,
    **kwargs,
):
    return _run(
        "sageattn_qk_int8_pv_fp8_cuda",
        q,
        k,
        v,
        tensor_layout,
        is_causal,
        sm_scale,
        {**kwargs, "qk_quant_gran": qk_quant_gran},
    )


def sageattn_qk_int8_pv_fp8_cuda_sm90(
    q,
    k,
    v,
    tensor_layout="HND",
    is_causal=False,
    qk_quant_gran="per_thread",
    sm_scale=None,
    pv_accum_dtype="fp32+fp32",
    smooth_k=True,
    return_lse=False,
    **kwargs,
):
    return _run(
        "sageattn_qk_int8_pv_fp8_cuda_sm90",
        q,
        k,
        v,
        tensor_layout,
        is_causal,
        sm_scale,
        {**kwargs, "qk_quant_gran": qk_quant_gran},
    )


def sageattn_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    is_causal=False,
    sm_scale=None,
    smooth_k=True,
    **kwargs,
):
    """FAKE sageattn_varlen: q (cu_seqlens_q[-1], num_qo_heads, head_dim)."""
    check_half(q, k, v)
    if q.shape[-1] > 128:
        raise ValueError(f"Unsupported head_dim: {q.shape[-1]}")
    if is_causal:
        assert torch.equal(cu_seqlens_q, cu_seqlens_k), "FAKE sageattn_varlen: causal needs qo_len == kv_len"
    record(
        calls,
        "sageattn_varlen",
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        is_causal=is_causal,
        sm_scale=sm_scale,
        kwargs=dict(kwargs),
    )
    # A sequence with no key divides by zero in its Triton kernel (nothing special-cases it): NaN rows.
    return fake_flash_attn.varlen(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        sm_scale,
        is_causal,
        0.0,
        "top_left",
        empty_rows="nan",
    )[0]
