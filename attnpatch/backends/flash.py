"""FlashAttention 2 (``flash_attn``) and FlashAttention 3 (``flash_attn_interface``), dense and varlen.

What each kernel takes, from the libraries' docstrings and source (flash_attn/flash_attn_interface.py,
hopper/flash_attn_interface.py, README):

- q: (batch, seqlen_q, nheads, headdim), k/v: (batch, seqlen_k, nheads_k, headdim): the dispatcher's layout, so no
  transpose. nheads % nheads_k == 0 (GQA/MQA) is native. fp16/bf16 only.
- FA2: Ampere or newer (sm80+), head dims up to 256 (the Python wrapper pads to a multiple of 8), dropout, backward,
  ``deterministic`` backward switch. FA3: Hopper only ("Requirements: H100 / H800 GPU"), head dim a multiple of 8
  up to 256, no dropout; its ``flash_attn_func`` returned ``(out, lse)`` in the beta and ``out`` since.
- ``causal=True`` is aligned to the bottom-right corner of the score matrix when seqlen_q != seqlen_k, while SDPA
  (and so the dispatcher) aligns it top-left: such calls get a reason (``causal_cross=False``) instead of an answer
  that differs silently.
- No attention mask. Key-padding masks go to the varlen kernels: keys packed with cu_seqlens, every query row kept,
  max_seqlen_k = the padded length (an upper bound; the exact max would cost a device sync).

The kernels here are shared with the Hub copies of the same libraries (attnpatch/backends/hub.py), which is why
they take the library as an argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from attnpatch.backends import _kernels
from attnpatch.backends._kernels import HALF, KernelFn
from attnpatch.registry import MASK_KEY_PADDING, MASK_NONE, Backend, Capabilities, register

FLASH_VERSION = "2.6.3"
FLASH_HINT = " --no-build-isolation"
FA3_HINT = (
    "build FlashAttention-3 from source: git clone https://github.com/Dao-AILab/flash-attention && "
    "cd flash-attention/hopper && python setup.py install"
)

NO_MASK = frozenset({MASK_NONE})
KEY_PADDING = frozenset({MASK_NONE, MASK_KEY_PADDING})


def flash2_kernel(library: Callable[[], Any]) -> KernelFn:
    """``flash_attn_func`` of the module ``library()`` returns, as a dispatcher kernel."""

    def flash(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
    ) -> torch.Tensor:
        """flash_attn_func(q, k, v) on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""
        return library().flash_attn_func(
            query,
            key,
            value,
            dropout_p=dropout_p,
            softmax_scale=scale,
            causal=is_causal,
            deterministic=_kernels.deterministic(),
        )

    return flash


def flash2_varlen_kernel(library: Callable[[], Any]) -> KernelFn:
    """``flash_attn_varlen_func`` of the module ``library()`` returns, serving key-padding masks."""

    def flash_varlen(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
    ) -> torch.Tensor:
        """flash_attn_varlen_func on packed keys; query (batch, seq_q, heads, head_dim) -> same layout out."""
        batch, seq_q = query.shape[0], query.shape[1]
        packed_key, packed_value, cu_seqlens_k = _kernels.pack_keys(key, value, attn_mask)
        out = library().flash_attn_varlen_func(
            query.flatten(0, 1),
            packed_key,
            packed_value,
            _kernels.cu_seqlens(batch, seq_q, query.device),
            cu_seqlens_k,
            seq_q,
            key.shape[1],
            dropout_p=dropout_p,
            softmax_scale=scale,
            causal=is_causal,
            deterministic=_kernels.deterministic(),
        )
        return _kernels.varlen_output(out, batch, attn_mask)

    return flash_varlen


def flash3_kernel(library: Callable[[], Any]) -> KernelFn:
    """``flash_attn_func`` of FlashAttention-3 (or 4: same call) from the module ``library()`` returns."""

    def flash_3(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
    ) -> torch.Tensor:
        """FA3 flash_attn_func on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""
        out = library().flash_attn_func(query, key, value, softmax_scale=scale, causal=is_causal)
        return out[0] if isinstance(out, tuple) else out

    return flash_3


def flash3_varlen_kernel(library: Callable[[], Any]) -> KernelFn:
    """FlashAttention-3 ``flash_attn_varlen_func`` from the module ``library()`` returns."""

    def flash_varlen_3(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
    ) -> torch.Tensor:
        """FA3 flash_attn_varlen_func on packed keys; query (batch, seq_q, heads, head_dim) -> same layout out."""
        batch, seq_q = query.shape[0], query.shape[1]
        packed_key, packed_value, cu_seqlens_k = _kernels.pack_keys(key, value, attn_mask)
        out = library().flash_attn_varlen_func(
            query.flatten(0, 1),
            packed_key,
            packed_value,
            _kernels.cu_seqlens(batch, seq_q, query.device),
            cu_seqlens_k,
            seq_q,
            key.shape[1],
            softmax_scale=scale,
            causal=is_causal,
        )
        return _kernels.varlen_output(out[0] if isinstance(out, tuple) else out, batch, attn_mask)

    return flash_varlen_3


def flash2_caps(masks: frozenset[str], priority: int, **overrides: Any) -> Capabilities:
    """What FlashAttention-2 serves (shared with flash_hub / flash_varlen_hub)."""
    fields: dict[str, Any] = {
        "devices": frozenset({"cuda"}),
        "dtypes": HALF,
        "max_head_dim": 256,
        "same_v_head_dim": True,
        "masks": masks,
        "causal_cross": False,
        "min_compute_capability": (8, 0),
        "priority": priority,
        **overrides,
    }
    return Capabilities(**fields)


def flash3_caps(masks: frozenset[str], priority: int, **overrides: Any) -> Capabilities:
    """What FlashAttention-3 serves (shared with _flash_3_hub / _flash_3_varlen_hub, and flash_4_hub)."""
    fa3: dict[str, Any] = {
        "head_dim_multiple": 8,
        "dropout": False,
        "deterministic": False,  # its backward switch is not forwarded: the beta and current signatures differ
        "min_compute_capability": (9, 0),
        "max_compute_capability": (9, 0),
    }
    return flash2_caps(masks, priority, **{**fa3, **overrides})


def _module(name: str) -> Callable[[], Any]:
    return lambda: _kernels.lib(name)


_fa3_requires = _kernels.requires("flash_attn_interface", "flash-attn-3", hint=FA3_HINT)


register(
    Backend(
        "flash",
        _kernels.external("flash", flash2_kernel(_module("flash_attn"))),
        family="flash",
        # Below _native_cudnn (45): on Hopper cuDNN beats FlashAttention-2; above torch's bundled FA2 (40).
        caps=flash2_caps(NO_MASK, priority=44),
        requires=_kernels.requires("flash_attn", "flash-attn", FLASH_VERSION, FLASH_HINT),
        check=_kernels.library_check("flash_attn"),
        builtin=True,
        description="flash_attn.flash_attn_func (FlashAttention-2); sm80+, fp16/bf16, no mask",
    ),
    aliases=("flash_attn", "flash_attention", "flash_attn_2", "flash2", "fa2"),
)

register(
    Backend(
        "flash_varlen",
        _kernels.external("flash_varlen", flash2_varlen_kernel(_module("flash_attn"))),
        family="flash",
        caps=flash2_caps(KEY_PADDING, priority=43),
        requires=_kernels.requires("flash_attn", "flash-attn", FLASH_VERSION, FLASH_HINT),
        check=_kernels.library_check("flash_attn"),
        builtin=True,
        description="flash_attn.flash_attn_varlen_func: key-padding masks as packed sequences",
    ),
    aliases=("flash_attn_varlen",),
)

register(
    Backend(
        "_flash_3",
        _kernels.external("_flash_3", flash3_kernel(_module("flash_attn_interface"))),
        family="flash",
        caps=flash3_caps(NO_MASK, priority=60),
        requires=_fa3_requires,
        check=_kernels.library_check("flash_attn_interface"),
        builtin=True,
        description="FlashAttention-3 flash_attn_interface.flash_attn_func; Hopper (sm90) only",
    ),
    aliases=("flash_3", "flash3", "fa3", "flash_attn_3"),
)

register(
    Backend(
        "_flash_varlen_3",
        _kernels.external("_flash_varlen_3", flash3_varlen_kernel(_module("flash_attn_interface"))),
        family="flash",
        caps=flash3_caps(KEY_PADDING, priority=59),
        requires=_fa3_requires,
        check=_kernels.library_check("flash_attn_interface"),
        builtin=True,
        description="FlashAttention-3 flash_attn_varlen_func: key-padding masks as packed sequences; sm90",
    ),
    aliases=("flash_varlen_3", "_flash_3_varlen", "flash3_varlen"),
)
