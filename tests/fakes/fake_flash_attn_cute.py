"""FAKE ``flash_attn.cute`` (FlashAttention-4, PyPI ``flash-attn-4``): ``flash_attn_func`` with reference math.

Installed as ``sys.modules["flash_attn.cute"]``. Mirrors flash_attn/cute/interface.py of flash-attn-4 4.0.0b40
(``flash_attn_func`` l. 3820-3902, ``_flash_attn_fwd`` l. 594-900, ``_validate_head_dims`` l. 134-151,
``_flash_attn_bwd`` l. 2069-2123, ``FlashAttnFunc`` l. 3447-3530), not only its signature:

- the full keyword list, with ``qv`` as the 4th positional (since 4.0.0b9): a softmax scale passed positionally
  lands in ``qv`` and fails, as it would in the real one;
- returns ``(out, lse)`` always; ``lse`` (batch, nheads, seqlen_q) float32 when ``return_lse`` or an input
  requires grad, else None;
- the architecture is read as the real one reads it: ``FLASH_ATTENTION_ARCH`` if set, else the device's compute
  capability (here the one ``attnpatch.testing.emulate_device`` emulates); forward asserts ``arch // 10 in
  [8, 9, 10, 11, 12]``, the backward ``[9, 10, 11, 12]`` (raised when the backward runs, like the real one);
- ``_validate_head_dims`` of b40 on 9.x/10.x/11.x (nothing on 8.x/12.x), alignment ``16 // v.element_size()``;
- fp16/bf16 (fp8 is accepted by the real assert, but attnpatch never passes it), nheads % nheads_k == 0;
- causal aligned bottom-right (block_info.py: ``n_idx = m_idx + seqlen_k - seqlen_q``); no dropout parameter;
- ``__version__`` is "0.0.0": b40's ``__init__`` reads the metadata of "fa4", a name it is not installed under.
The real kernel asserts CUDA tensors; the fake computes on the CPU tensors of an emulated device.
"""

from __future__ import annotations

import math
import os

import torch

from fakes.reference import attention, check_half, record

__version__ = "0.0.0"
calls: list[dict[str, object]] = []


def _arch() -> int:
    override = os.environ.get("FLASH_ATTENTION_ARCH")
    if override is not None:
        digits = "".join(ch for ch in override if ch.isdigit())
        return int(digits)
    from attnpatch.core.capabilities import compute_capability

    major, minor = compute_capability(0)
    return major * 10 + minor


def _validate_head_dims(head_dim: int, head_dim_v: int, compute_capability: int, alignment: int) -> None:
    """As interface.py 4.0.0b40 l. 134-151."""
    is_deepseek_shape = head_dim == 192 and head_dim_v == 128
    is_deepseek_mla_absorbed_shape = (head_dim == 64 or head_dim == head_dim_v) and head_dim_v == 512
    is_hdim256_shape = head_dim == 256 and head_dim_v == 256
    is_standard_range = 8 <= head_dim <= 128 and 8 <= head_dim_v <= 128
    is_sm90_range = 8 <= head_dim <= 256 and 8 <= head_dim_v <= 256
    if compute_capability == 9:
        assert is_sm90_range and head_dim % alignment == 0 and head_dim_v % alignment == 0, (
            f"({head_dim}, {head_dim_v}) is not supported on SM90"
        )
    elif compute_capability in [10, 11]:
        assert (
            (is_standard_range or is_deepseek_shape or is_deepseek_mla_absorbed_shape or is_hdim256_shape)
            and head_dim % alignment == 0
            and head_dim_v % alignment == 0
        ), f"({head_dim}, {head_dim_v}) is not supported on SM100/SM110"


class _Backward(torch.autograd.Function):
    """Identity forward; the backward asserts the architectures of ``_flash_attn_bwd`` (l. 2123)."""

    @staticmethod
    def forward(ctx, out):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        arch = _arch()
        assert arch // 10 in [9, 10, 11, 12], "Unsupported compute capability. Supported: 9.x, 10.x, 11.x, 12.x"
        return grad


def flash_attn_func(
    q,
    k,
    v,
    qv=None,
    gather_kv_indices=None,
    softmax_scale=None,
    causal=False,
    window_size=(None, None),
    learnable_sink=None,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    score_mod=None,
    score_mod_bwd=None,
    mask_mod=None,
    aux_tensors=None,
    aux_scalars=None,
    block_sparse_tensors=None,
    block_sparse_tensors_bwd=None,
    return_lse=False,
    gather_bwd_recompute_p=False,
    gather_bwd_token_chunk=None,
    config=None,
    scales=None,
):
    """FAKE FA4 flash_attn_func: q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k, headdim[_v])
    -> (out (batch, seqlen_q, nheads, headdim_v), lse (batch, nheads, seqlen_q) or None)."""
    assert qv is None or isinstance(qv, torch.Tensor), "FAKE FA4: qv must be a tensor (a scale passed positionally?)"
    assert qv is None, "FAKE FA4: qv (MLA) is not faked"
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "FAKE FA4: (batch, seqlen, nheads, headdim) inputs"
    check_half(q.contiguous(), k.contiguous(), v.contiguous())
    arch = _arch()
    assert arch // 10 in [8, 9, 10, 11, 12], "Unsupported compute capability. Supported: 8.x, 9.x, 10.x, 11.x, 12.x"
    assert q.shape[2] % k.shape[2] == 0, "num_head must be divisible by num_head_kv"
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    alignment = 16 // v.element_size()
    if arch // 10 not in [8, 12]:
        _validate_head_dims(head_dim, head_dim_v, arch // 10, alignment)
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
        return_lse=return_lse,
    )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    assert learnable_sink is None, "FAKE FA4: learnable_sink is not faked"
    full: list[torch.Tensor] = []
    window = None if tuple(window_size) == (None, None) else tuple(window_size)
    causal_mode = "bottom_right" if causal else None
    out = attention(q, k, v, scale=scale, causal=causal_mode, softcap=softcap or 0.0, window=window, lse=full)
    requires_grad = any(t.requires_grad for t in (q, k, v))
    lse = full[0] if requires_grad or return_lse else None  # (batch, nheads, seqlen_q) float32
    if requires_grad and torch.is_grad_enabled():
        out = _Backward.apply(out)
    return out, lse
