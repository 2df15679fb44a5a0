"""PyTorch's scaled_dot_product_attention, automatic or pinned to one of its kernels.

``native`` lets torch pick the kernel. The ``_native_*`` variants pin one kernel with ``sdpa_kernel`` so a user
can test or force it; each declares what that kernel takes, so a call it cannot serve falls back with a reason
instead of failing inside torch with "No available kernel".
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnpatch.backends import _extras, _math, _probe
from attnpatch.backends._define import define
from attnpatch.backends._probe import cuda_reasons
from attnpatch.core import masks
from attnpatch.core.call import MASK_NONE, BackendFn, CallSpec, ExtraArgs, ExtraFn, SdpaArgs
from attnpatch.core.capabilities import Capabilities

if TYPE_CHECKING:
    from typing_extensions import Unpack

HALF = frozenset({torch.float16, torch.bfloat16})
# torch's SDPA itself (F.scaled_dot_product_attention is this builtin), bound once: while attnpatch's SDPA redirect
# is installed, F.scaled_dot_product_attention is the redirect's Python wrapper (~0.4 us a call), and native, which
# routed calls reach, means torch's kernel choice, not whatever F.scaled_dot_product_attention was replaced with.
_sdpa = torch._C._nn.scaled_dot_product_attention


def native(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """F.scaled_dot_product_attention on (batch, seq, heads, head_dim) tensors; torch picks the kernel.

    On torch >= 2.5 SDPA already returns 0 for query rows with no key to attend, so no extra fix-up is needed.

    Heads_kv may divide heads whatever ``enable_gqa`` says, so SDPA always gets ``enable_gqa=True``: reading both
    heads counts (two ``tensor.shape``, ~2.8k instructions) costs more than the keyword (~1.7k, less after
    another keyword). Where the heads are equal the flag changes nothing in torch: the kernel choice
    (``check_batch_size_and_num_heads_dense`` in sdp_utils_cpp.h, the one place it reads the flag) and the math
    kernel's GQA step (``pre_process_group_query_attention_input``) both return early for equal heads
    (tests/backends/test_native_gqa_flag.py checks the CPU kernel choice and outputs; docs/kernel-facts.md).
    """
    # native_bhsd's body on transposed views, inline: one more Python call level would cost ~0.15 us per call.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if not dropout_p and not is_causal and scale is None:
        # Every argument costs torch's parser, a keyword most (the first one makes Python build a dict): the plain
        # calls pass only what they need, the mask positionally.
        if attn_mask is None:
            return _sdpa(q, k, v, enable_gqa=True).transpose(1, 2)
        return _sdpa(q, k, v, attn_mask, enable_gqa=True).transpose(1, 2)
    return _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=True).transpose(1, 2)


def native_bhsd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """:func:`native` for (batch, heads, seq, head_dim) tensors, SDPA's own layout: out (batch, heads_q, seq_q,
    head_dim_v). Heads_kv may divide heads_q whatever enable_gqa says: SDPA always gets ``enable_gqa=True``, which
    changes nothing where the heads are equal (see :func:`native`)."""
    if not dropout_p and not is_causal and scale is None:  # (as in native)
        if attn_mask is None:
            return _sdpa(query, key, value, enable_gqa=True)
        return _sdpa(query, key, value, attn_mask, enable_gqa=True)
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=True)


def _with_extras(run: BackendFn, math_fallback: bool) -> ExtraFn:
    # ``run`` (native, or a pinned kernel) with the later arguments it declares. A window is folded into the mask.
    # Without softcap: ``run`` serves the window alone, and torch's CPU flash kernel returns the lse (for
    # return_lse, and sinks as out * sigmoid(lse - sink)) where it serves the call exactly
    # (:func:`attnpatch.backends._extras.cpu_flash_lse_serves`); a pinned kernel declares the lse only where it
    # does. With ``math_fallback`` everything else (softcap, an lse on GPU, an lse or sinks with gradients) runs as
    # torch operations in float32 (attnpatch/backends/_math.py), with memory (batch, heads, seq_q, seq_kv).
    def run_extra(
        *args: Unpack[SdpaArgs], **extra: Unpack[ExtraArgs]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = args
        softcap, sinks, return_lse = extra.get("softcap"), extra.get("sinks"), extra.get("return_lse", False)
        attn_mask, is_causal = _extras.fold_window(query, key, attn_mask, is_causal, extra.get("window"))
        if softcap is None and sinks is None and not return_lse:
            return run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        tensors = (query, key, value, sinks)
        if softcap is None and (not math_fallback or _extras.cpu_flash_lse_serves(query, value, dropout_p, *tensors)):
            out, lse = _extras.cpu_flash_lse(query, key, value, attn_mask, is_causal, scale)
            out = out if sinks is None else _extras.add_sinks(out, lse, sinks)
            return (out, lse) if return_lse else out
        call = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return _math.attention(*call, softcap=softcap, sinks=sinks, return_lse=return_lse)

    run_extra.__name__ = run_extra.__qualname__ = f"{run.__name__}_extra"
    return run_extra


# ``native`` for calls with the later arguments (attnpatch/core/call.py), (batch, seq, heads, head_dim): every one
# of them, the lse with its gradient (the torch operations of _math are differentiable).
native_extra = _with_extras(native, math_fallback=True)
EXTRAS: dict[str, Any] = {"softcap": True, "window": True, "sinks": True, "return_lse": True, "lse_grad": True}


def _pinned(kernel: SDPBackend, expand_gqa: bool = False) -> BackendFn:
    # The pinned kernels have the same contract as `native`; only the kernel choice differs. Kernels without
    # native GQA get key/value heads repeated, which is what torch's own fallback would do.
    def run(*args: Unpack[SdpaArgs]) -> torch.Tensor:
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = args
        if kernel == SDPBackend.FLASH_ATTENTION:
            # The flash kernels need stride 1 in the head dim (a transposed view gets "No available kernel").
            query, key, value = (_probe.last_dim_contiguous(t) for t in (query, key, value))
        if expand_gqa and key.shape[2] != query.shape[2]:
            repeat = query.shape[2] // key.shape[2]
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        with sdpa_kernel(kernel):
            out = native(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return masks.zero_fully_masked(out, attn_mask) if attn_mask is not None and kernel != SDPBackend.MATH else out

    run.__name__ = run.__qualname__ = f"sdpa_{kernel.name.lower()}"
    return run


define(
    "native",
    native,
    family="native",
    caps=Capabilities(priority=10, **EXTRAS),
    description="torch.nn.functional.scaled_dot_product_attention, kernel chosen by torch",
    aliases=("sdpa", "torch", "default", "_native"),
    extra_fn=native_extra,
    fn_bhsd=native_bhsd,
    is_sdpa=True,
)
define(
    "_native_math",
    _pinned(SDPBackend.MATH),
    family="native",
    caps=Capabilities(**EXTRAS),  # priority 0: a reference, never picked by `auto`
    description="SDPA pinned to the math (reference) kernel: any device and dtype, slowest",
    aliases=("math", "_native_math_sdpa"),
    # The later arguments: the same math written out in torch operations (float32, float64 for float64 inputs).
    extra_fn=_math.attention,
)


def _define_pinned(
    name: str, kernel: SDPBackend, caps: Capabilities, description: str, expand_gqa: bool = False, **options: Any
) -> None:
    # A pinned kernel serves the later arguments its capabilities declare as _with_extras does: a window as a
    # mask, on CPU the flash kernel's lse.
    run = _pinned(kernel, expand_gqa)
    extra_fn = _with_extras(run, math_fallback=False)
    define(name, run, family="native", caps=caps, description=description, extra_fn=extra_fn, **options)


_define_pinned(
    "_native_flash",
    SDPBackend.FLASH_ATTENTION,
    # The CPU flash kernel takes masks, fp32/fp64 and any head dim but no dropout; the CUDA one (FA2
    # inside torch) takes fp16/bf16, head_dim <= 256 and no arbitrary mask.
    # On CPU `native` already picks this kernel when it can, so `auto` ranks it only on CUDA.
    # Windows become masks; on CPU the kernel returns the lse (no gradient), and sinks are served from it.
    Capabilities(devices=frozenset({"cpu", "cuda"}), priority={"cuda": 40}, window=True, sinks=True, return_lse=True),
    "SDPA pinned to its FlashAttention kernel (torch's bundled FA2 on CUDA, its own on CPU)",
    check=lambda call: _flash_sdpa_reasons(call),
)


def _flash_sdpa_reasons(call: CallSpec) -> list[str]:
    reasons = []
    if call.head_dim_v != call.head_dim:
        # torch's flash kernels (CPU and CUDA) take one head dim ("No available kernel" otherwise), e.g. DeepSeek-V3
        reasons.append(f"value head_dim {call.head_dim_v} != query head_dim {call.head_dim}")
    if call.device_type == "cpu":
        if call.dropout:
            reasons.append("the CPU flash kernel has no dropout")
        if call.sinks and call.needs_grad:
            reasons.append("serves sinks from the CPU flash kernel's lse, which has no gradient (inputs require grad)")
        return reasons
    if call.return_lse or call.sinks:
        reasons.append("returns no lse on CUDA in attnpatch (return_lse, sinks): use native or flash")
    if call.dtype not in HALF:
        reasons.append(f"needs dtype bfloat16 or float16 on CUDA, got {str(call.dtype).replace('torch.', '')}")
    if max(call.head_dim, call.head_dim_v) > 256:
        reasons.append(f"head_dim {max(call.head_dim, call.head_dim_v)} > 256")
    if call.head_dim % 8:
        reasons.append(f"head_dim {call.head_dim} is not a multiple of 8")
    if call.mask_kind != MASK_NONE:
        reasons.append(f"does not take an attn_mask on CUDA (got a {call.mask_kind.replace('_', '-')} mask)")
    if call.window:
        reasons.append("takes no window on CUDA (a window is served as a mask, which it does not take there)")
    return reasons


# What the pinned CUDA kernels (efficient, cuDNN) share: key/value heads repeated for GQA, windows as masks.
CUDA_PINNED = Capabilities(devices=frozenset({"cuda"}), head_dim_multiple=8, window=True)

_define_pinned(
    "_native_efficient",
    SDPBackend.EFFICIENT_ATTENTION,
    dataclasses.replace(CUDA_PINNED, dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), priority=30),
    "SDPA pinned to its memory-efficient (xFormers-derived) kernel; CUDA",
    expand_gqa=True,
    requires=cuda_reasons,
    aliases=("efficient", "mem_efficient"),
)
_define_pinned(
    "_native_cudnn",
    SDPBackend.CUDNN_ATTENTION,
    dataclasses.replace(
        CUDA_PINNED, dtypes=HALF, max_head_dim=128, same_v_head_dim=True, min_compute_capability=(8, 0), priority=45
    ),
    "SDPA pinned to its cuDNN attention kernel; CUDA, compute capability >= 8.0",
    expand_gqa=True,
    requires=cuda_reasons,
    aliases=("cudnn",),
)
