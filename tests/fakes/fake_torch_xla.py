"""FAKE ``torch_xla`` with ``torch_xla.experimental.custom_kernel.flash_attention``, reference math on any device.

Installed as ``torch_xla``, ``torch_xla.experimental`` and ``torch_xla.experimental.custom_kernel``. Kept from
torch_xla/experimental/custom_kernel.py: (batch, num_heads, seq_len, d_model) inputs with as many key heads as
query heads, ``sm_scale`` defaulting to 1.0 (not 1/sqrt(d)), and the Pallas kernel's top-left causal mask
(``col_ids <= row_ids``). ``flash_attention_2_2`` is the older signature without ``sm_scale``.
"""

from __future__ import annotations

from fakes.reference import attention, record

__version__ = "2.5.0"
calls: list[dict[str, object]] = []


def flash_attention(
    q,
    k,
    v,
    causal=False,
    q_segment_ids=None,
    kv_segment_ids=None,
    sm_scale=1.0,
    *,
    ab=None,
    partition_spec=None,
    mesh=None,
):
    """FAKE flash_attention: q [batch_size, num_heads, q_seq_len, d_model]."""
    assert q.dim() == 4 and q.shape[1] == k.shape[1] == v.shape[1], "FAKE torch_xla: q, k, v need the same heads"
    record(calls, "flash_attention", q=q, k=k, v=v, causal=causal, sm_scale=sm_scale)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return attention(q, k, v, scale=sm_scale, causal="top_left" if causal else None).transpose(1, 2)


def flash_attention_2_2(q, k, v, causal=False, partition_spec=None, mesh=None):
    """FAKE flash_attention of torch_xla 2.2: no sm_scale parameter, an implicit scale of 1.0."""
    return _flash_attention(q, k, v, causal=causal)


_flash_attention = flash_attention
