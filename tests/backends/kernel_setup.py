"""Shared setup of the kernel-library backend tests (flash, sage, xformers, aiter, hub, xla, npu) on a CPU machine.

The real libraries need a GPU, TPU or NPU. tests/fakes holds a fake of each that implements the library's
documented signature with reference math and records every call; the ``fakes`` fixture installs them into
sys.modules under the real names. The tests prove argument mapping, layouts, causal alignment, varlen packing,
mask-to-bias conversion, GQA, reasons and fallback. tests/test_gpu.py runs the real libraries where present;
tests/real_kernels/ runs those a CPU can run.

How a CPU test reaches a GPU-only adapter, and why that is honest: every backend here declares its devices (and
compute capability), checked per call from the tensors, and its ``requires`` asks whether a GPU exists. The
``pretend`` fixture uses ``attnpatch.testing.emulate_device``, which changes exactly those three facts: CPU
tensors count as being on device 0 of the pretended kind, with the pretended compute capability, and the GPU
(an AMD one with ``rocm=True``) counts as present. Everything else (dtype, head dim, masks,
causal alignment, GQA, dropout, versions, imports) is checked for real and the adapter runs for real, on CPU
tensors, against the fake. Without ``pretend`` the same calls are refused (test_cpu_tensors_are_refused), and
every test that expects an answer from a backend runs in strict mode, so a refusal cannot hide behind a fallback.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from fakes import (
    fake_aiter,
    fake_flash_attn,
    fake_flash_attn_cute,
    fake_flash_attn_interface,
    fake_kernels,
    fake_sageattention,
    fake_torch_npu,
    fake_torch_xla,
    fake_xformers,
)

from attnpatch.backends import hub
from attnpatch.core import capabilities, dispatch, masks, registry

# The table: every one of these must be registered, listed, and covered by a contract test below.
TABLE = (
    "flash",
    "flash_varlen",
    "_flash_3",
    "_flash_varlen_3",
    "flash_4",
    "flash_hub",
    "flash_varlen_hub",
    "_flash_3_hub",
    "_flash_3_varlen_hub",
    "flash_4_hub",
    "aiter_fa2_hub",
    "sage_hub",
    "sage_blackwell_hub",
    "aiter",
    "sage",
    "sage_varlen",
    "_sage_qk_int8_pv_fp8_cuda",
    "_sage_qk_int8_pv_fp8_cuda_sm90",
    "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton",
    "xformers",
    "_native_xla",
    "_native_npu",
)

# name -> (device, compute capability, ROCm, dtype, head_dim, fake module, the function it must call)
SETUP: dict[str, tuple[str, tuple[int, int], bool, torch.dtype, int, Any, str]] = {
    "flash": ("cuda", (8, 0), False, torch.float16, 64, fake_flash_attn, "flash_attn_func"),
    "flash_varlen": ("cuda", (8, 6), False, torch.bfloat16, 64, fake_flash_attn, "flash_attn_varlen_func"),
    "_flash_3": ("cuda", (9, 0), False, torch.bfloat16, 64, fake_flash_attn_interface, "flash_attn_func"),
    "_flash_varlen_3": ("cuda", (9, 0), False, torch.float16, 64, fake_flash_attn_interface, "flash_attn_varlen_func"),
    "flash_4": ("cuda", (10, 0), False, torch.bfloat16, 64, fake_flash_attn_cute, "flash_attn_func"),
    "flash_hub": ("cuda", (8, 0), False, torch.float16, 64, fake_flash_attn, "flash_attn_func"),
    "flash_varlen_hub": ("cuda", (8, 0), False, torch.float16, 64, fake_flash_attn, "flash_attn_varlen_func"),
    "_flash_3_hub": ("cuda", (9, 0), False, torch.bfloat16, 64, fake_flash_attn_interface, "flash_attn_func"),
    "_flash_3_varlen_hub": (
        "cuda",
        (9, 0),
        False,
        torch.bfloat16,
        64,
        fake_flash_attn_interface,
        "flash_attn_varlen_func",
    ),
    "flash_4_hub": ("cuda", (10, 0), False, torch.bfloat16, 64, fake_flash_attn_cute, "flash_attn_func"),
    "aiter_fa2_hub": ("cuda", (9, 4), True, torch.bfloat16, 64, fake_aiter, "flash_attn_func"),
    "sage_hub": ("cuda", (9, 0), False, torch.float16, 64, fake_sageattention, "sageattn"),
    "sage_blackwell_hub": ("cuda", (12, 0), False, torch.bfloat16, 64, fake_kernels, "sageattn3_blackwell"),
    "aiter": ("cuda", (9, 4), True, torch.float16, 64, fake_aiter, "flash_attn_func"),
    "sage": ("cuda", (8, 9), False, torch.float16, 64, fake_sageattention, "sageattn"),
    "sage_varlen": ("cuda", (8, 0), False, torch.float16, 64, fake_sageattention, "sageattn_varlen"),
    "_sage_qk_int8_pv_fp8_cuda": (
        "cuda",
        (8, 9),
        False,
        torch.float16,
        64,
        fake_sageattention,
        "sageattn_qk_int8_pv_fp8_cuda",
    ),
    "_sage_qk_int8_pv_fp8_cuda_sm90": (
        "cuda",
        (9, 0),
        False,
        torch.bfloat16,
        64,
        fake_sageattention,
        "sageattn_qk_int8_pv_fp8_cuda_sm90",
    ),
    "_sage_qk_int8_pv_fp16_cuda": (
        "cuda",
        (8, 0),
        False,
        torch.float16,
        64,
        fake_sageattention,
        "sageattn_qk_int8_pv_fp16_cuda",
    ),
    "_sage_qk_int8_pv_fp16_triton": (
        "cuda",
        (8, 6),
        False,
        torch.float16,
        64,
        fake_sageattention,
        "sageattn_qk_int8_pv_fp16_triton",
    ),
    "xformers": ("cuda", (8, 0), False, torch.float16, 64, fake_xformers, "memory_efficient_attention"),
    "_native_xla": ("xla", (0, 0), False, torch.bfloat16, 64, fake_torch_xla, "flash_attention"),
    "_native_npu": ("npu", (0, 0), False, torch.float16, 64, fake_torch_npu, "npu_fusion_attention"),
}

VARLEN = ("flash_varlen", "_flash_varlen_3", "sage_varlen", "flash_varlen_hub", "_flash_3_varlen_hub")
SAGE = tuple(name for name in TABLE if "sage" in name)

# What each backend must refuse among the scenarios of test_scenarios, and the reason it must give. Everything
# not listed here must be served and match the reference.
CAUSAL_BOTTOM_RIGHT = "aligns causal masks bottom-right"
SAGE_CAUSAL = "supports is_causal only when seq_q == seq_kv"
REFUSALS: dict[tuple[str, str], str] = {
    **{
        (name, "causal_cross"): CAUSAL_BOTTOM_RIGHT
        for name in TABLE
        if "flash" in name or "aiter" in name  # every FlashAttention and AITER build aligns causal bottom-right
    },
    **{(name, "causal_cross"): SAGE_CAUSAL for name in SAGE},
    ("sage_blackwell_hub", "scale"): "ignores a custom softmax scale",
}

ROCM_REASON = "needs a ROCm build of torch (torch.version.hip is None): this kernel runs on AMD GPUs"


def forget() -> None:
    # Availability is cached per backend, routing decisions per call kind, Hub downloads per revision: forget all
    # of it when the fakes come and go (trust and pins are kept: tests set them after the fakes).
    hub.forget_downloads()
    registry.refresh()
    dispatch.reset_fallbacks()


def setup_backend(name: str, pretend: Any) -> tuple[torch.dtype, int, Any, str]:
    device, capability, rocm, dtype, head_dim, module, function = SETUP[name]
    pretend(device, capability, rocm)
    if name in hub.KERNELS:
        hub.trust_hub_kernels(True)
    return dtype, head_dim, module, function


def qkv(
    batch: int = 2,
    seq_q: int = 12,
    seq_kv: int | None = None,
    heads: int = 4,
    heads_kv: int | None = None,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""
    generator = torch.Generator().manual_seed(seed)
    seq_kv = seq_q if seq_kv is None else seq_kv
    heads_kv = heads if heads_kv is None else heads_kv

    def make(seq: int, h: int) -> torch.Tensor:
        return torch.randn(batch, seq, h, head_dim, generator=generator).to(dtype)

    return make(seq_q, heads), make(seq_kv, heads_kv), make(seq_kv, heads_kv)


def expected(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """torch's SDPA in float64 (independent of the fakes' math), 0 for query rows with no key, in q's dtype."""
    mask = None
    if attn_mask is not None:
        mask, _ = masks.normalize(attn_mask, q, k)
        if is_causal:
            mask, _ = masks.fold_causal(mask, "", q.shape[1], k.shape[1])
            is_causal = False
        if mask.dtype != torch.bool:
            mask = mask.double()
    out = F.scaled_dot_product_attention(
        *(t.double().transpose(1, 2) for t in (q, k, v)),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=True,
    ).transpose(1, 2)
    return masks.zero_fully_masked(out.nan_to_num(0.0), mask).to(q.dtype)


def assert_matches(out: torch.Tensor, reference: torch.Tensor) -> None:
    assert out.shape == reference.shape and out.dtype == reference.dtype
    assert not out.isnan().any(), "NaN in the output"
    atol, rtol = capabilities.DEFAULT_TOLERANCE[out.dtype]
    torch.testing.assert_close(out, reference, atol=atol, rtol=rtol)


def calls_of(module: Any, function: str) -> list[dict[str, Any]]:
    return [call for call in module.calls if call["function"] == function]


def padding_mask(lengths: list[int], seq: int, left: bool = False) -> torch.Tensor:
    """(batch, seq) bool key padding: the first (or, left padded, the last) lengths[b] keys are real."""
    positions = torch.arange(seq)[None]
    count = torch.tensor(lengths)[:, None]
    return positions >= seq - count if left else positions < count


def bias_mask(kind: str, batch: int, heads: int, seq_q: int, seq_kv: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if kind == "key_padding":
        return padding_mask([seq_kv, 0], seq_kv, left=True)[:batch]
    if kind == "bool_4d":
        keep = torch.rand(batch, heads, seq_q, seq_kv, generator=generator) > 0.4
        keep[0, 0, 0] = False  # one query row with no key
        return keep
    if kind == "bool_3d":
        return torch.rand(batch, seq_q, seq_kv, generator=generator) > 0.4
    additive = torch.randn(batch, 1, seq_q, seq_kv, generator=generator)
    additive[1, 0, 2] = float("-inf")
    return additive.masked_fill(torch.rand(batch, 1, seq_q, seq_kv, generator=generator) > 0.7, float("-inf"))
