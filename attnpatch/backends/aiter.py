"""AMD AITER ``aiter.flash_attn_func`` (aiter >= 0.1.5): Composable-Kernel FlashAttention for ROCm (MI200/MI300).

From aiter/ops/mha.py: the FlashAttention-2 interface (q (batch, seqlen, nheads, headdim), k/v with nheads_k
dividing nheads), fp16/bf16, head dims padded to a multiple of 8 (up to 256), dropout, a backward that is
deterministic by default. ``causal=True`` is aligned bottom-right when seqlen_q != seqlen_k, so such calls get a
reason. Depending on the version, ``flash_attn_func`` returns ``out`` or a tuple starting with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from attnpatch.backends import _probe, hub
from attnpatch.backends._define import define
from attnpatch.backends._probe import HALF
from attnpatch.core.call import MASK_NONE, BackendFn
from attnpatch.core.capabilities import Capabilities

AITER_VERSION = "0.1.5"
AITER_HINT = " (or build it from https://github.com/ROCm/aiter)"


def aiter_kernel(library: Callable[[], Any]) -> BackendFn:
    """``flash_attn_func`` of the module ``library()`` returns (aiter, or its Hub build), as a dispatcher kernel."""

    def aiter(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
        enable_gqa: bool,
    ) -> torch.Tensor:
        """aiter flash_attn_func on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""
        out = library().flash_attn_func(query, key, value, dropout_p=dropout_p, softmax_scale=scale, causal=is_causal)
        return out[0] if isinstance(out, tuple) else out

    return aiter


# What AITER's FlashAttention serves (shared with aiter_fa2_hub).
AITER = Capabilities(
    devices=frozenset({"cuda"}),  # ROCm tensors are "cuda" tensors; requires() checks for a ROCm torch
    dtypes=HALF,
    max_head_dim=256,
    same_v_head_dim=True,
    masks=frozenset({MASK_NONE}),
    causal_cross=False,
    priority=55,  # above torch's aotriton flash (40) on MI300, the only other kernel there
)


def aiter_caps(**overrides: Any) -> Capabilities:
    """:data:`AITER` with ``overrides``."""
    return dataclasses.replace(AITER, **overrides)


define(
    "aiter",
    aiter_kernel(lambda: _probe.lib("aiter")),
    family="aiter",
    caps=aiter_caps(),
    requires=_probe.requires("aiter", "amd-aiter", AITER_VERSION, AITER_HINT, device="rocm"),
    check=_probe.library_check("aiter"),
    description="AMD AITER flash_attn_func (CK FlashAttention); ROCm, fp16/bf16, no mask",
    kernel=True,
    aliases=("aiter_attn", "aiter_flash"),
)


# AITER's FlashAttention from the Hugging Face Hub (opt-in; see attnpatch/backends/hub.py): bf16 instances only.
hub.define_hub(
    "aiter_fa2_hub",
    aiter_kernel(hub.module("aiter_fa2_hub")),
    aiter_caps(dtypes=frozenset({torch.bfloat16}), priority=0),
    "AITER FlashAttention from kernels-community/aiter-flash-attn-ck (Hub, opt-in); ROCm, bf16",
    _probe.compiled_dropout_reasons,
)
