"""FAKE ``sageattention`` 1.0.6 (Triton only): ``sageattn`` and ``sageattn_varlen``, exact math.

Kept from the 1.0.x sources: head_dim must be 64, 96 or 128 (64 or 128 for varlen), and ``smooth_k`` subtracts the
key mean *in place* (``k -= km``), which would change the caller's key tensor if it were passed in directly.

Kept from running the real 1.0.6 kernels (tests/real_kernels/test_sage_library.py, docs/kernel-truth.md): the
Triton kernels do not mask the last, partial block of 64 keys, so in a non-causal call the keys past the end enter
the softmax as zero keys with zero values (what the interpreter reads there; on a GPU, whatever memory holds) and
the output comes out too small. Causal calls (seq_q == seq_kv) are right: their mask hides those keys.
"""

from __future__ import annotations

import itertools

import torch

from fakes import fake_sageattention
from fakes.reference import record

BLOCK_N = 64  # keys per block of the attention kernel


def _unmasked_tail(t: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """``t`` with zero keys appended up to a multiple of BLOCK_N along ``seq_dim``: the keys the kernel reads."""
    missing = -t.shape[seq_dim] % BLOCK_N
    if not missing:
        return t
    shape = list(t.shape)
    shape[seq_dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=seq_dim)


__version__ = "1.0.6"
calls: list[dict[str, object]] = []


def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kwargs):
    assert q.size(-1) in [64, 96, 128], "headdim should be in [64, 96, 128]."
    seq_dim = 1 if tensor_layout == "NHD" else 2
    if smooth_k:
        k -= k.mean(dim=seq_dim, keepdim=True)  # in place, as 1.0.x does (softmax is shift-invariant per row)
    record(calls, "sageattn", q=q, k=k, v=v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale)
    if not is_causal:
        k, v = _unmasked_tail(k, seq_dim), _unmasked_tail(v, seq_dim)
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
    if not is_causal:
        bounds = cu_seqlens_k.tolist()
        pieces = [(k[a:b], v[a:b]) for a, b in itertools.pairwise(bounds)]
        pieces = [(_unmasked_tail(pk, 0), _unmasked_tail(pv, 0)) for pk, pv in pieces]
        k, v = torch.cat([pk for pk, _ in pieces]), torch.cat([pv for _, pv in pieces])
        lengths = torch.tensor([0] + [pk.shape[0] for pk, _ in pieces], device=cu_seqlens_k.device)
        cu_seqlens_k = lengths.cumsum(0).to(cu_seqlens_k.dtype)
        max_seqlen_k = -max_seqlen_k // BLOCK_N * -BLOCK_N
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
