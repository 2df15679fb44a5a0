"""FAKE ``torch_npu`` with ``npu_fusion_attention``, reference math on any device.

Installed as ``sys.modules["torch_npu"]``. Kept from the torch_npu API reference: ``atten_mask`` True = masked
(shapes BNSS, B1SS, 11SS or SS), ``scale`` defaulting to 1.0, ``keep_prob`` for dropout, ``head_num`` = query heads
with key heads dividing it, ``sparse_mode`` 2 = leftUpCausal with the compressed 2048x2048 mask, seven outputs.
"""

from __future__ import annotations

import torch

from fakes.reference import attention, check_half, record

__version__ = "2.5.1"
calls: list[dict[str, object]] = []


def npu_fusion_attention(
    query,
    key,
    value,
    head_num,
    input_layout,
    pse=None,
    padding_mask=None,
    atten_mask=None,
    scale=1.0,
    keep_prob=1.0,
    pre_tockens=2147483647,
    next_tockens=2147483647,
    inner_precise=0,
    prefix=None,
    actual_seq_qlen=None,
    actual_seq_kvlen=None,
    sparse_mode=0,
    gen_mask_parallel=True,
    sync=False,
):
    """FAKE npu_fusion_attention; only the BSND layout is implemented."""
    assert input_layout == "BSND", f"FAKE torch_npu: layout {input_layout} not implemented in the fake"
    check_half(query, key, value)
    assert head_num == query.shape[2] and head_num % key.shape[2] == 0, "FAKE torch_npu: head_num / N2"
    record(
        calls,
        "npu_fusion_attention",
        query=query,
        key=key,
        value=value,
        head_num=head_num,
        scale=scale,
        keep_prob=keep_prob,
        atten_mask=atten_mask,
        sparse_mode=sparse_mode,
        pre_tockens=pre_tockens,
        next_tockens=next_tockens,
    )
    causal = None
    keep = None
    if sparse_mode == 2:
        assert atten_mask is not None and tuple(atten_mask.shape) == (2048, 2048), "FAKE: compressed causal mask"
        assert torch.equal(atten_mask, torch.ones_like(atten_mask).triu(1)), "FAKE: upper triangle = masked"
        causal = "top_left"
    elif atten_mask is not None:
        assert sparse_mode == 0 and atten_mask.dtype == torch.bool, "FAKE torch_npu: bool atten_mask"
        b, n = atten_mask.shape[0], atten_mask.shape[1]
        assert atten_mask.dim() == 2 or (b, n) in ((1, 1), (query.shape[0], 1), (query.shape[0], query.shape[2])), (
            f"FAKE torch_npu: atten_mask shape {tuple(atten_mask.shape)} is none of BNSS, B1SS, 11SS, SS"
        )
        keep = ~atten_mask
    out = attention(
        query, key, value, scale=scale, causal=causal, keep=keep, dropout_p=1.0 - keep_prob, empty_rows="nan"
    )
    return out, None, None, None, 0, 0, 0
