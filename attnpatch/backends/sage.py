"""SageAttention (``sageattention``): INT8 Q·K with FP16 or FP8 P·V. Lossy, inference only.

What the kernels take, from sageattention/core.py (2.1.1+, and the 1.0.x Triton-only release):

- ``tensor_layout="NHD"`` is the dispatcher's (batch, seq, heads, head_dim) layout; num_qo_heads must be a
  multiple of num_kv_heads (GQA is native); fp16/bf16; ``sm_scale`` is honoured (default 1/sqrt(head_dim)).
- There is no attn_mask, dropout or enable_gqa parameter, but every entry point takes ``**kwargs`` and drops them
  without a word: a mask or dropout passed through would be silently ignored. So masked and dropout calls get a
  reason here, never a call.
- ``is_causal`` is "only applicable when qo_len == kv_len": other lengths get a reason.
- Head dims: 2.x pads to 64 or 128 and raises above 128; 1.0.x asserts head_dim in {64, 96, 128} ({64, 128} for
  varlen) and subtracts the key mean *in place* (``k -= km``), so the 1.0.x kernels get a copy of the key.
- Architectures: ``sageattn`` picks a kernel by compute capability and raises on any it does not know (sm80, 86,
  89, 90, 120 in 2.1.1); the CUDA kernels exist only if they were built for this GPU (``SM80/89/90_ENABLED``);
  the Triton kernels are "currently not usable on sm120" (its own comment), so on 12.x the CUDA kernels get
  ``qk_quant_gran="per_warp"`` as ``sageattn`` does.
- No backward pass. Quantisation makes every kernel lossy: ``auto`` picks one only when lossy backends are allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
from collections.abc import Callable
from typing import Any

import torch

from attnpatch.backends import _probe, _varlen, hub
from attnpatch.backends._define import define
from attnpatch.backends._probe import HALF
from attnpatch.core.call import MASK_KEY_PADDING, MASK_NONE, BackendFn, CallSpec
from attnpatch.core.capabilities import Capabilities
from attnpatch.core.versions import version_tuple

# sageattn's own dispatch table in 2.1.1 (core.py): any other architecture raises ValueError inside the call.
SAGEATTN_ARCHS = ((8, 0), (8, 6), (8, 9), (9, 0), (12, 0))
V1_HEAD_DIMS = {"sageattn": (64, 96, 128), "sageattn_varlen": (64, 128)}

# Measured against a float64 reference in SageAttention's papers: INT8 Q·K keeps ~99.9% cosine similarity, which
# per element means errors of a few 1e-2. FP8 P·V adds to that.
INT8_TOLERANCE = {torch.float16: (5e-2, 5e-2), torch.bfloat16: (6e-2, 6e-2)}
FP8_TOLERANCE = {torch.float16: (8e-2, 8e-2), torch.bfloat16: (8e-2, 8e-2)}


def _library() -> Any:
    return _probe.lib("sageattention")


@_probe.constant_for_compile
def _major_version() -> int:
    # From the distribution metadata when there is one (no import needed), else from the imported module. A
    # constant for torch.compile, which cannot trace into importlib.metadata.
    try:
        version = importlib.metadata.version("sageattention")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(sys.modules.get("sageattention"), "__version__", "2")
    parts = version_tuple(version)
    return parts[0] if parts else 2


def _mutates_key(library: Any) -> bool:
    # 1.0.x has none of the 2.x CUDA entry points, and its sageattn/sageattn_varlen do `k -= km` in place.
    return not hasattr(library, "sageattn_qk_int8_pv_fp16_cuda")


def sage_kernel(function: str, library: Callable[[], Any] = _library, per_warp_on_sm12: bool = False) -> BackendFn:
    """``library().<function>(q, k, v, tensor_layout="NHD", ...)`` as a dispatcher kernel.

    ``sageattn_varlen`` serves key-padding masks: keys packed with cu_seqlens, every query row kept.
    """

    def sage(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
        enable_gqa: bool,
    ) -> torch.Tensor:
        """SageAttention on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim), NHD."""
        module = library()
        query, key, value = (_probe.last_dim_contiguous(t) for t in (query, key, value))
        kernel = getattr(module, function)
        if function == "sageattn_varlen":
            copy_key = _mutates_key(module)
            return _varlen.run_varlen(
                kernel, query, key, value, attn_mask, copy_key=copy_key, is_causal=is_causal, sm_scale=scale
            )
        if _mutates_key(module):
            key = key.clone()
        extra: dict[str, Any] = {}
        if per_warp_on_sm12 and _probe.compute_capability(query.device.index)[0] == 12:
            extra["qk_quant_gran"] = "per_warp"
        return kernel(query, key, value, tensor_layout="NHD", is_causal=is_causal, sm_scale=scale, **extra)

    sage.__name__ = function
    return sage


# What every SageAttention kernel serves (shared with sage_hub and sage_blackwell_hub).
SAGE = Capabilities(
    devices=frozenset({"cuda"}),
    dtypes=HALF,
    max_head_dim=128,
    same_v_head_dim=True,
    masks=frozenset({MASK_NONE}),
    dropout=False,
    backward=False,
    lossy=True,
    min_compute_capability=(8, 0),
    tolerance=INT8_TOLERANCE,
)


def sage_caps(masks: frozenset[str] = frozenset({MASK_NONE}), **overrides: Any) -> Capabilities:
    """:data:`SAGE` with ``masks`` and ``overrides``."""
    return dataclasses.replace(SAGE, masks=masks, **overrides)


def sage_check(
    function: str,
    *,
    archs: tuple[tuple[int, int], ...] | None = None,
    built: str | None = None,
    triton: bool = False,
    package: bool = True,
) -> Callable[[CallSpec], list[str]]:
    """Per-call reasons for one SageAttention entry point (see the module docstring for each rule's source).

    ``package=False`` is for the Hub build (``sage_hub``, below): no import of, or version read from, the
    ``sageattention`` package.
    """

    def check(call: CallSpec) -> list[str]:
        reasons = _probe.same_length_causal(call, "SageAttention")
        if package:
            reasons += _probe.import_reasons("sageattention", call)
        if reasons:
            return reasons
        v1 = package and _major_version() < 2
        if v1 and function in V1_HEAD_DIMS and call.head_dim not in V1_HEAD_DIMS[function]:
            dims = ", ".join(map(str, V1_HEAD_DIMS[function]))
            reasons.append(
                f"sageattention 1.x {function} takes head_dim {dims}, got {call.head_dim} "
                "(sageattention>=2.1.1 pads any head_dim <= 128)"
            )
        if archs is not None and not v1:
            reasons += _probe.capability_in(call, archs, f"the architectures {function} dispatches to")
        if triton and call.device_type == "cuda" and _probe.compute_capability(call.device_index)[0] == 12:
            reasons.append(
                "SageAttention's Triton kernels are not usable on compute capability 12.x (per sageattention)"
            )
        if built is not None and package:
            core = getattr(sys.modules.get("sageattention"), "core", None)
            if core is not None and getattr(core, built, True) is False:
                reasons.append(f"sageattention was built without the kernel {function} needs ({built} is False)")
        return reasons

    return check


def _define(
    name: str,
    kernel: BackendFn,
    caps: Capabilities,
    check: Callable[[CallSpec], list[str]],
    min_version: str,
    description: str,
    aliases: tuple[str, ...] = (),
) -> None:
    define(
        name,
        kernel,
        family="sage",
        caps=caps,
        requires=_probe.requires("sageattention", "sageattention", min_version),
        check=check,
        description=description,
        aliases=aliases,
        kernel=True,
    )


_define(
    "sage",
    sage_kernel("sageattn"),
    sage_caps(priority=70),
    sage_check("sageattn", archs=SAGEATTN_ARCHS),
    "1.0.0",
    "sageattention.sageattn: picks the kernel for this GPU; INT8, lossy, no mask/dropout/backward",
    aliases=("sage_attn", "sageattn", "sage_attention", "sageattention"),
)
_define(
    "sage_varlen",
    sage_kernel("sageattn_varlen"),
    sage_caps(frozenset({MASK_NONE, MASK_KEY_PADDING}), priority=62),
    sage_check("sageattn_varlen", triton=True),
    "1.0.0",
    "sageattention.sageattn_varlen: key-padding masks as packed sequences; INT8 (Triton), lossy",
    aliases=("sageattn_varlen", "sage_attn_varlen"),
)
_define(
    "_sage_qk_int8_pv_fp8_cuda",
    sage_kernel("sageattn_qk_int8_pv_fp8_cuda", per_warp_on_sm12=True),
    sage_caps(min_compute_capability=(8, 9), tolerance=FP8_TOLERANCE, priority=67),
    sage_check("sageattn_qk_int8_pv_fp8_cuda", built="SM89_ENABLED"),
    "2.1.1",
    "SageAttention2 INT8 QK + FP8 PV CUDA kernel (sm89+, the Ada kernel); lossy",
)
_define(
    "_sage_qk_int8_pv_fp8_cuda_sm90",
    sage_kernel("sageattn_qk_int8_pv_fp8_cuda_sm90"),
    sage_caps(min_compute_capability=(9, 0), max_compute_capability=(9, 0), tolerance=FP8_TOLERANCE, priority=68),
    sage_check("sageattn_qk_int8_pv_fp8_cuda_sm90", built="SM90_ENABLED"),
    "2.1.1",
    "SageAttention2 INT8 QK + FP8 PV CUDA kernel for Hopper (sm90 only); lossy",
)
_define(
    "_sage_qk_int8_pv_fp16_cuda",
    sage_kernel("sageattn_qk_int8_pv_fp16_cuda", per_warp_on_sm12=True),
    sage_caps(priority=66),
    sage_check("sageattn_qk_int8_pv_fp16_cuda", built="SM80_ENABLED"),
    "2.1.1",
    "SageAttention2 INT8 QK + FP16 PV CUDA kernel (sm80+); lossy",
)
_define(
    "_sage_qk_int8_pv_fp16_triton",
    sage_kernel("sageattn_qk_int8_pv_fp16_triton"),
    sage_caps(priority=64),
    sage_check("sageattn_qk_int8_pv_fp16_triton", triton=True),
    "2.1.1",
    "SageAttention INT8 QK + FP16 PV Triton kernel (sm80+); lossy",
)


# ----- SageAttention from the Hugging Face Hub (opt-in; see attnpatch/backends/hub.py) ---------------------------
# SageAttention3 for Blackwell takes (batch, heads, seq, head_dim), head dims 64 and 128, derives its scale from
# the head dim and subtracts the key mean in place.


def sage3_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """sageattn3_blackwell on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""
    heads, heads_kv = query.shape[2], key.shape[2]
    if heads_kv != heads:
        key = key.repeat_interleave(heads // heads_kv, dim=2)
        value = value.repeat_interleave(heads // heads_kv, dim=2)
    # (batch, heads, seq, head_dim), the layout it takes. The key is always copied: the kernel subtracts its mean
    # in place, and a caller's key may already be (batch, heads, seq, head_dim) in memory, where no copy is made.
    q, v = (t.transpose(1, 2).contiguous() for t in (query, value))
    k = key.transpose(1, 2).clone(memory_format=torch.contiguous_format)
    return hub.load("sage_blackwell_hub").sageattn3_blackwell(q, k, v, is_causal=is_causal).transpose(1, 2)


def _sage3_head_dims(call: CallSpec) -> list[str]:
    # Its own code: "Unsupported Headdim" (sdpa instead) at >= 256; diffusers measured 64 and 128 as the only dims
    # that compile and run (smaller ones are rejected, non powers of two fail in the Triton pre-pass).
    if call.head_dim not in (64, 128):
        return [f"sageattn3_blackwell takes head_dim 64 or 128, got {call.head_dim}"]
    return []


hub.define_hub(
    "sage_hub",
    sage_kernel("sageattn", hub.module("sage_hub")),
    sage_caps(priority=0),
    "SageAttention from SageAttention/sage-attention (Hub, opt-in); INT8, lossy",
    sage_check("sageattn", archs=SAGEATTN_ARCHS, package=False),
)
hub.define_hub(
    "sage_blackwell_hub",
    sage3_kernel,
    sage_caps(
        scale=False,
        min_compute_capability=(10, 0),
        max_compute_capability=(12, 0),
        tolerance={torch.float16: (0.25, 0.25), torch.bfloat16: (0.25, 0.25)},  # FP4
        priority=0,
    ),
    "SageAttention3 (FP4) for Blackwell from SageAttention/sage-blackwell (Hub, opt-in); lossy",
    lambda call: _probe.capability_in(call, ((10, 0), (12, 0)), "the architectures it is built for"),
    lambda call: _probe.same_length_causal(call, "SageAttention3"),
    _sage3_head_dims,
)
