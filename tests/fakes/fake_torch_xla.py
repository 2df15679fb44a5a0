"""FAKE ``torch_xla`` with ``torch_xla.experimental.custom_kernel.flash_attention``, reference math on any device.

Installed as ``torch_xla``, ``torch_xla.experimental`` and ``torch_xla.experimental.custom_kernel``. Mirrors
torch_xla/experimental/custom_kernel.py of 2.4.0-2.9.0 (``flash_attention`` 2.9.0 l. 854-868,
``_fa_custom_forward_single_device`` 2.7.0 l. 333-420, ``_pad_to_block_size`` l. 499-517) over JAX's Pallas
kernel (jax/experimental/pallas/ops/tpu/flash_attention.py: ``_flash_attention_impl``, ``_verify_block``,
``_flash_attention_kernel_single_batch``), per ``__version__`` (default "2.9.0"):

- (batch, num_heads, seq_len, d_model) inputs, as many key heads as query heads, v with q's head dim
  ("V model dimension unequal to KV model dimension unsupported");
- ``sm_scale`` defaults to 1.0 (not 1/sqrt(d)) and multiplies the logits after ``ab`` is added;
- causal: the Pallas kernel's ``col_ids <= row_ids`` on absolute positions (top-left);
- keys in blocks of ``min(512, seq_kv)``: before 2.7 a seq_kv the block does not divide raises ValueError
  (``_verify_block``); from 2.7 k/v are padded with zeros to the block and only ``ab`` is padded (with
  finfo.min), so without ``ab`` the softmax runs over the zero keys; the backward gets the unpadded keys and
  raises the same ValueError;
- with more than one key block, head_dim > 128 must be a multiple of 128 (NotImplementedError).
torch_xla 2.2 has no custom_kernel.py and 2.3's ``flash_attention(q, k, v, segment_ids=None, causal=False)`` has
no scale and no backward: neither is faked, attnpatch refuses both by version.
"""

from __future__ import annotations

import torch

from fakes.reference import attention, record

__version__ = "2.9.0"
calls: list[dict[str, object]] = []
BLOCK_K = 512
MIN_BLOCK_SIZE = 128


def _version() -> tuple[int, ...]:
    return tuple(int(part) for part in __version__.split("+")[0].split(".")[:2])


def _verify_block(block_name, dim_name, block, dim):
    if dim % block != 0:
        raise ValueError(f"{dim_name}={dim} should be divisible by {block_name}={block}")


class _UnpaddedBackward(torch.autograd.Function):
    """Identity forward; the backward raises as 2.7-2.9's does on the unpadded keys (``_verify_block``)."""

    @staticmethod
    def forward(ctx, out, kv_seq_len):
        ctx.kv_seq_len = kv_seq_len
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        _verify_block("block_k_major_dkv", "kv_seq_len", min(BLOCK_K, ctx.kv_seq_len), ctx.kv_seq_len)
        return grad, None


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
    """FAKE flash_attention: q [batch_size, num_heads, q_seq_len, d_model] -> the same shape."""
    assert q.dim() == 4 and q.shape[1] == k.shape[1] == v.shape[1], "FAKE torch_xla: q, k, v need the same heads"
    if v.shape[-1] != q.shape[-1]:
        raise NotImplementedError("V model dimension unequal to KV model dimension unsupported")
    record(calls, "flash_attention", q=q, k=k, v=v, causal=causal, sm_scale=sm_scale, ab=ab)
    kv_seq_len = k.shape[2]
    block = min(BLOCK_K, kv_seq_len)
    if kv_seq_len % block:
        if _version() < (2, 7):
            _verify_block("block_k_major", "kv_seq_len", block, kv_seq_len)
        pad = block - kv_seq_len % block
        k = torch.cat([k, k.new_zeros(*k.shape[:2], pad, k.shape[3])], dim=2)
        v = torch.cat([v, v.new_zeros(*v.shape[:2], pad, v.shape[3])], dim=2)
        if ab is not None:
            ab = torch.cat([ab, ab.new_full((*ab.shape[:3], pad), torch.finfo(ab.dtype).min)], dim=3)
    head_dim = q.shape[-1]
    if block != k.shape[2] and head_dim > MIN_BLOCK_SIZE and head_dim % MIN_BLOCK_SIZE:
        raise NotImplementedError(f"head_dim={head_dim} should be a multiple of {MIN_BLOCK_SIZE} if larger")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    bias = None if ab is None else ab.double() * sm_scale  # the kernel scales (logits + ab)
    out = attention(q, k, v, scale=sm_scale, bias=bias, causal="top_left" if causal else None).transpose(1, 2)
    if kv_seq_len % block and torch.is_grad_enabled() and out.requires_grad:
        out = _UnpaddedBackward.apply(out, kv_seq_len)
    return out
