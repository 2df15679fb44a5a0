"""FAKE ``sageattention`` 1.0.6 (Triton only): ``sageattn`` and ``sageattn_varlen``, exact math.

Kept from the 1.0.x sources: head_dim must be 64, 96 or 128 (64 or 128 for varlen), and ``smooth_k`` subtracts the
key mean *in place* (``k -= km``), which would change the caller's key tensor if it were passed in directly.
"""

from __future__ import annotations

from fakes import fake_sageattention
from fakes.reference import record

__version__ = "1.0.6"
calls: list[dict[str, object]] = []


def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kwargs):
    assert q.size(-1) in [64, 96, 128], "headdim should be in [64, 96, 128]."
    seq_dim = 1 if tensor_layout == "NHD" else 2
    if smooth_k:
        k -= k.mean(dim=seq_dim, keepdim=True)  # in place, as 1.0.x does (softmax is shift-invariant per row)
    record(calls, "sageattn", q=q, k=k, v=v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale)
    return fake_sageattention._run("sageattn", q, k, v, tensor_layout, is_causal, sm_scale, kwargs)


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
    assert q.size(-1) in [64, 128], "varlen only support head_dim [64, 128]."
    if smooth_k:
        k -= k.mean(dim=0, keepdim=True)
    return fake_sageattention.sageattn_varlen(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        is_causal=is_causal,
        sm_scale=sm_scale,
        smooth_k=False,
        **kwargs,
    )
