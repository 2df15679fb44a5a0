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
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from attnpatch.backends import _probe, _varlen, hub
from attnpatch.backends._define import define
from attnpatch.core.call import MASK_KEY_PADDING, MASK_NONE, BackendFn, CallSpec, SdpaArgs
from attnpatch.core.capabilities import Capabilities
from attnpatch.core.versions import installed_version, version_tuple

if TYPE_CHECKING:
    from typing_extensions import Unpack

# sageattn's own dispatch table in 2.1.1 (core.py): any other architecture raises ValueError inside the call.
SAGEATTN_ARCHS = ((8, 0), (8, 6), (8, 9), (9, 0), (12, 0))
V1_HEAD_DIMS = {"sageattn": (64, 96, 128), "sageattn_varlen": (64, 128)}

# Calibrated on the real SageAttention 1.0.6 Triton kernels against float64 (2,552 calls, docs/kernel-truth.md):
# correct results reach 0.054 (fp16) / 0.057 (bf16) at the default scale, and grow with the logit scale
# (scale * sqrt(head_dim): 0.074 of it at most); the tail-block bug below is >= 0.084. So atol 0.08, no relative
# term, multiplied by max(1, scale * sqrt(head_dim)) (Capabilities.tolerance_grows_with_logits). FP8 P·V adds
# error on top of INT8 Q·K: not yet measured on a GPU, kept at 0.08 with a relative term.
INT8_TOLERANCE = {torch.float16: (8e-2, 0.0), torch.bfloat16: (8e-2, 0.0)}
FP8_TOLERANCE = {torch.float16: (8e-2, 8e-2), torch.bfloat16: (8e-2, 8e-2)}

# Upstream commit 3917283 (first released in 2.2.0) masks the scores of the last, partial block of keys in the
# Triton attention kernels; before it, the keys past the end entered the softmax sum and outputs came out 25-37%
# too small whenever seq_kv % 64 != 0 (non-causal). The CUDA kernels mask it (csrc/qattn/attn_utils.cuh).
TAIL_FIXED_IN = (2, 2, 0)
KEY_BLOCK = 64
# The non-causal Triton kernels of a build with that commit mask the last key block with this call; builds of main
# from 0d30f5c to 628a89f already say 2.2.0 without it (docs/kernel-truth.md: they give 2.1.1's wrong answers).
TAIL_FIX_MARK = "tl.where(k_mask"
TAIL_KERNEL_FILES = ("triton/attn_qk_int8_per_block.py", "triton/attn_qk_int8_block_varlen.py")
TRITON_FUNCTIONS = ("sageattn_varlen", "sageattn_qk_int8_pv_fp16_triton")
# The kernels compute element offsets in int32 (upstream issue 386): a tensor whose largest offset passes this is
# copied contiguous, and a call whose contiguous tensors still pass it is refused.
INT32_OFFSETS = 2**31
# The package index serves only 1.0.6: SageAttention 2.x is built from source for the GPU at hand.
BUILD_2X = (
    "PyPI serves only 1.0.6; build SageAttention 2.x for your GPU: git clone https://github.com/thu-ml/SageAttention "
    "&& cd SageAttention && pip install --no-build-isolation ."
)


def _library() -> Any:
    return _probe.lib("sageattention")


@_probe.constant_for_compile
def _version() -> tuple[int, ...]:
    # The imported module's __version__, else the distribution metadata (no import needed). A build that states
    # no version counts as 2.0: rules for releases before 2.2.0 apply (refused rather than wrong). A constant for
    # torch.compile, which cannot trace into importlib.metadata.
    version = installed_version("sageattention", "sageattention")
    return (version_tuple(version) if version else ()) or (2, 0)


@_probe.constant_for_compile
def _tail_fix_in_source() -> bool | None:
    """False when the installed kernels' source provably lacks the fix, None when it cannot be read. Imports
    nothing: the package's files are read where find_spec says they are."""
    try:
        spec = importlib.util.find_spec("sageattention")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    try:
        return all(TAIL_FIX_MARK in (package / name).read_text() for name in TAIL_KERNEL_FILES)
    except OSError:
        return None


def tail_block_reasons(call: CallSpec, version: tuple[int, ...], function: str) -> list[str]:
    """Why ``function``'s kernel in sageattention ``version`` would give a wrong answer for ``call`` (else []).

    Found by running the real 1.0.6 kernels (tests/real_kernels/test_sage_library.py): causal calls (seq_q ==
    seq_kv, see same_length_causal) are right, their mask hides the missing keys; multiples of 64 keys are right.
    A key-padding mask's per-sequence lengths are known only on the device, so masked varlen calls are refused.
    """
    fixed = version >= TAIL_FIXED_IN and _tail_fix_in_source() is not False
    if fixed or call.is_causal:
        return []
    if function == "sageattn":
        # 1.x is Triton only; 2.x's sageattn runs its CUDA kernels (which mask the tail) except on sm86.
        on_triton = version < (2,) or (
            call.device_type == "cuda" and _probe.compute_capability(call.device_index) == (8, 6)
        )
    else:
        on_triton = function in TRITON_FUNCTIONS
    if not on_triton:
        return []
    installed = ".".join(map(str, version))
    if version >= TAIL_FIXED_IN:
        installed += " (a build from before upstream commit 3917283)"
    head = f"sageattention {installed}'s Triton kernels do not mask the last block of {KEY_BLOCK} keys"
    fix = f"fixed in sageattention >= 2.2.0 (upstream commit 3917283); {BUILD_2X}"
    if function == "sageattn_varlen" and call.mask_kind == MASK_KEY_PADDING:
        return [
            f"{head}: non-causal sequences whose length is not a multiple of {KEY_BLOCK} come out too small, and "
            f"a key-padding mask's lengths are not known before the call; {fix}"
        ]
    if call.seq_kv % KEY_BLOCK:
        return [
            f"{head}: non-causal attention over {call.seq_kv} keys (not a multiple of {KEY_BLOCK}) comes out too "
            f"small; {fix}"
        ]
    return []


def int32_reasons(call: CallSpec) -> list[str]:
    """A call whose contiguous tensors have element offsets past int32 (upstream issue 386): refused."""
    largest = max(call.heads_q * call.head_dim, call.heads_kv * max(call.head_dim, call.head_dim_v))
    if call.seq_q * largest >= INT32_OFFSETS or call.seq_kv * largest >= INT32_OFFSETS:
        return [
            f"SageAttention computes offsets in int32 and {max(call.seq_q, call.seq_kv)} tokens x {largest} "
            "values per token pass 2**31 (upstream issue 386): split the sequence or use another backend"
        ]
    return []


def _offsets_fit(tensor: torch.Tensor) -> torch.Tensor:
    # The largest element offset the kernel computes (in int32) for this tensor's strides; a strided view (a fused
    # QKV projection) passes 2**31 three times sooner than its contiguous copy, which int32_reasons checks.
    largest = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return tensor.contiguous() if largest >= INT32_OFFSETS else tensor


def _mutates_key(library: Any) -> bool:
    # 1.0.x has none of the 2.x CUDA entry points, and its sageattn/sageattn_varlen do `k -= km` in place.
    return not hasattr(library, "sageattn_qk_int8_pv_fp16_cuda")


def sage_kernel(function: str, library: Callable[[], Any] = _library, per_warp_on_sm12: bool = False) -> BackendFn:
    """``library().<function>(q, k, v, tensor_layout="NHD", ...)`` as a dispatcher kernel.

    ``sageattn_varlen`` serves key-padding masks: keys packed with cu_seqlens, every query row kept.
    """

    def sage(*args: Unpack[SdpaArgs]) -> torch.Tensor:
        """SageAttention on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim), NHD."""
        query, key, value, attn_mask, _, is_causal, scale, _ = args
        module = library()
        query, key, value = (_offsets_fit(_probe.last_dim_contiguous(t)) for t in (query, key, value))
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
SAGE = dataclasses.replace(
    _probe.FUSED_CUDA,
    max_head_dim=128,
    masks=frozenset({MASK_NONE}),
    dropout=False,
    backward=False,
    lossy=True,
    min_compute_capability=(8, 0),
    tolerance=INT8_TOLERANCE,
    tolerance_grows_with_logits=True,
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
        reasons = _probe.same_length_causal(call, "SageAttention") + int32_reasons(call)
        if package:
            reasons += _probe.import_reasons("sageattention", call)
        if reasons:
            return reasons
        v1 = package and _version() < (2,)
        if v1 and function in V1_HEAD_DIMS and call.head_dim not in V1_HEAD_DIMS[function]:
            dims = ", ".join(map(str, V1_HEAD_DIMS[function]))
            reasons.append(
                f"sageattention 1.x {function} takes head_dim {dims}, got {call.head_dim} "
                "(sageattention>=2.1.1 pads any head_dim <= 128)"
            )
        if package:
            reasons += tail_block_reasons(call, _version(), function)
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
    function: str,
    caps: Capabilities,
    min_version: str,
    description: str,
    aliases: tuple[str, ...] = (),
    per_warp_on_sm12: bool = False,
    **check: Any,
) -> None:
    # One pip SageAttention entry point: its kernel and its per-call check (``check``: sage_check's options).
    define(
        name,
        sage_kernel(function, per_warp_on_sm12=per_warp_on_sm12),
        family="sage",
        caps=caps,
        requires=_probe.requires("sageattention", "sageattention", min_version, upgrade=BUILD_2X),
        check=sage_check(function, **check),
        description=description,
        aliases=aliases,
        kernel=True,
    )


_define(
    "sage",
    "sageattn",
    sage_caps(priority=70),
    "1.0.0",
    "sageattention.sageattn: picks the kernel for this GPU; INT8, lossy, no mask/dropout/backward",
    aliases=("sage_attn", "sageattn", "sage_attention", "sageattention"),
    archs=SAGEATTN_ARCHS,
)
_define(
    "sage_varlen",
    "sageattn_varlen",
    sage_caps(frozenset({MASK_NONE, MASK_KEY_PADDING}), priority=62),
    "1.0.0",
    "sageattention.sageattn_varlen: key-padding masks as packed sequences; INT8 (Triton), lossy",
    aliases=("sageattn_varlen", "sage_attn_varlen"),
    triton=True,
)
_define(
    "_sage_qk_int8_pv_fp8_cuda",
    "sageattn_qk_int8_pv_fp8_cuda",
    sage_caps(min_compute_capability=(8, 9), tolerance=FP8_TOLERANCE, priority=67),
    "2.1.1",
    "SageAttention2 INT8 QK + FP8 PV CUDA kernel (sm89+, the Ada kernel); lossy",
    per_warp_on_sm12=True,
    built="SM89_ENABLED",
)
_define(
    "_sage_qk_int8_pv_fp8_cuda_sm90",
    "sageattn_qk_int8_pv_fp8_cuda_sm90",
    sage_caps(min_compute_capability=(9, 0), max_compute_capability=(9, 0), tolerance=FP8_TOLERANCE, priority=68),
    "2.1.1",
    "SageAttention2 INT8 QK + FP8 PV CUDA kernel for Hopper (sm90 only); lossy",
    built="SM90_ENABLED",
)
_define(
    "_sage_qk_int8_pv_fp16_cuda",
    "sageattn_qk_int8_pv_fp16_cuda",
    sage_caps(priority=66),
    "2.1.1",
    "SageAttention2 INT8 QK + FP16 PV CUDA kernel (sm80+); lossy",
    per_warp_on_sm12=True,
    built="SM80_ENABLED",
)
_define(
    "_sage_qk_int8_pv_fp16_triton",
    "sageattn_qk_int8_pv_fp16_triton",
    sage_caps(priority=64),
    "2.1.1",
    "SageAttention INT8 QK + FP16 PV Triton kernel (sm80+); lossy",
    triton=True,
)


# ----- SageAttention from the Hugging Face Hub (opt-in; see attnpatch/backends/hub.py) ---------------------------
# SageAttention3 for Blackwell takes (batch, heads, seq, head_dim), head dims 64 and 128, derives its scale from
# the head dim and subtracts the key mean in place. It runs on sm_120 only (mha_fwd refuses all but 12.0/12.1; the
# Hub build targets sm_120a) and needs as many key heads as query heads, so key/value heads are repeated, which is
# exact: each head is quantised on its own.


def sage3_kernel(*args: Unpack[SdpaArgs]) -> torch.Tensor:
    """sageattn3_blackwell on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""
    query, key, value, _, _, is_causal, _, _ = args
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
        min_compute_capability=(12, 0),
        max_compute_capability=(12, 0),
        tolerance={torch.float16: (0.25, 0.25), torch.bfloat16: (0.25, 0.25)},  # FP4
        priority=0,
    ),
    "SageAttention3 (FP4) for Blackwell from SageAttention/sage-blackwell (Hub, opt-in); lossy",
    lambda call: _probe.same_length_causal(call, "SageAttention3"),
    _sage3_head_dims,
)
