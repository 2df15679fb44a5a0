"""FAKE ``aiter`` (AMD AITER, PyPI ``amd-aiter``): ``flash_attn_func`` of aiter/ops/mha.py with reference math.

Installed as ``sys.modules["aiter"]``; also the fake Hub build kernels-community/aiter-flash-attn-ck. Mirrors
aiter/ops/mha.py of amd-aiter 0.1.7.post2.dev18 (``flash_attn_func`` l. 1774-1860, ``FlashAttnFunc.forward``
l. 1625-1697), not only its signature:

- the FlashAttention-2 layout and conventions: causal aligned bottom-right, "If the row of the mask is all zero,
  the output will be zero", fp16/bf16, nheads_k dividing nheads, ``deterministic=True`` by default;
- the result: ``out`` alone, or a tuple ``(out, softmax_lse[, S_dmask])`` when ``return_lse`` /
  ``return_attn_probs`` ask for more (``result[0] if len(result) == 1 else tuple(result)``);
- with autograd on and an input that requires grad, the forward asserts ``return_lse`` (l. 1675: the backward
  needs the lse);
- no ``__version__`` attribute: AMD's ``aiter/__init__.py`` defines none (it is in ``aiter/_version.py``), and the
  package is told from PyPI's unrelated ``aiter`` by ``flash_attn_func`` at the top level (``from .ops.mha
  import *``), which this fake has.
"""

from __future__ import annotations

import torch

from fakes import fake_flash_attn
from fakes.reference import attention, record

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
    how_v3_bf16_cvt=1,
    cu_seqlens_q=None,
    cu_seqlens_kv=None,
):
    """FAKE aiter.flash_attn_func: q (batch_size, seqlen, nheads, headdim_q) -> out (batch_size, seqlen, nheads,
    headdim_v), or (out, softmax_lse[, S_dmask]) with return_lse / return_attn_probs."""
    fake_flash_attn._check(q, k, v)
    is_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if is_grad:
        assert return_lse  # as the real FlashAttnFunc.forward, with no message
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
        return_lse=return_lse,
    )
    out = attention(q, k, v, scale=softmax_scale, causal="bottom_right" if causal else None, dropout_p=dropout_p)
    result = [out]
    if return_lse:
        result.append(torch.zeros(q.shape[0], q.shape[2], q.shape[1]))
    if return_attn_probs:
        result.append(torch.empty(0))
    return result[0] if len(result) == 1 else tuple(result)
