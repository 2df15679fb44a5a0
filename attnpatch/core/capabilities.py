"""What a backend can serve (:class:`Capabilities`) and why it refuses one call (:func:`capability_reasons`).

Reasons are sentences a user can act on; an empty list means the backend can serve the call. The compute
capability of a CUDA device is read here once per device (or taken from the device being emulated).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from attnpatch.core.call import ALL_MASKS, MASK_NONE, CallSpec, dtype_name, emulated

# Default tolerances against a float64 reference, by input dtype (atol, rtol). Backends that are lossy or
# accumulate differently declare their own.
DEFAULT_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


@dataclass(frozen=True)
class Capabilities:
    """What a backend can serve. ``None`` for devices/dtypes/head dims means 'any'.

    devices: device types ("cpu", "cuda", "xla", "npu", "mps").
    min_compute_capability: for CUDA, the lowest (major, minor) the kernel runs on.
    max_compute_capability: for CUDA, the highest major.minor the kernel runs on (None = no limit).
    head_dim_multiple: the head dim must be a multiple of this (8 for most fused kernels).
    masks: which normalised mask kinds are accepted (see MASK_*).
    causal_cross: causal with seq_q != seq_kv is served top-left aligned like SDPA. Kernels that align the
        causal mask bottom-right (flash-attn) must say False here, or their answer differs silently.
    gqa: key/value may have fewer heads than query.
    scale: a custom softmax scale is honoured (not silently replaced by 1/sqrt(head_dim)).
    lossy: quantises inputs (int8/fp8); `auto` skips it unless lossy backends are allowed.
    compile_safe: runs under torch.compile(fullgraph=True) without a graph break.
    priority: order for `auto` (higher is tried first) among backends that can serve a call; an int, or a
        mapping device type -> int for kernels whose rank differs by device (missing device = 0 = never auto).
    tolerance: (atol, rtol) per input dtype against a float64 reference (see tolerance_for).
    softcap, window, sinks, return_lse: the dispatcher's later arguments of the same names are served (see
        :func:`attnpatch.core.dispatch.dispatch_attention`); a backend that does not declare one never receives
        it. A window is aligned like causal: ``causal_cross=False`` also refuses windows when seq_q != seq_kv.
    lse_grad: the returned log-sum-exp carries a gradient (False: the kernel's lse is a constant to autograd,
        so return_lse is refused when inputs require grad).
    """

    devices: frozenset[str] | None = None
    dtypes: frozenset[torch.dtype] | None = None
    min_head_dim: int = 1
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    same_v_head_dim: bool = False
    masks: frozenset[str] = ALL_MASKS
    causal: bool = True
    causal_cross: bool = True
    cross: bool = True
    gqa: bool = True
    dropout: bool = True
    scale: bool = True
    backward: bool = True
    compile_safe: bool = True
    deterministic: bool = True
    lossy: bool = False
    min_compute_capability: tuple[int, int] | None = None
    max_compute_capability: tuple[int, int] | None = None
    priority: int | dict[str, int] = 0
    tolerance: dict[torch.dtype, tuple[float, float]] = field(default_factory=dict)
    tolerance_grows_with_logits: bool = False
    softcap: bool = False
    window: bool = False
    sinks: bool = False
    return_lse: bool = False
    lse_grad: bool = False

    def priority_for(self, device_type: str) -> int:
        if isinstance(self.priority, dict):
            return self.priority.get(device_type, 0)
        return self.priority

    def tolerance_for(
        self, dtype: torch.dtype, scale: float | None = None, head_dim: int | None = None
    ) -> tuple[float, float]:
        """(atol, rtol) against a float64 reference for inputs of ``dtype``.

        With ``tolerance_grows_with_logits`` (quantised Q·K: the error of the logits grows with their size), atol
        is multiplied by ``max(1, scale * sqrt(head_dim))``, the logit scale relative to the default softmax scale.
        """
        atol, rtol = self.tolerance.get(dtype) or DEFAULT_TOLERANCE.get(dtype, (3e-2, 3e-2))
        if self.tolerance_grows_with_logits and scale is not None and head_dim:
            atol *= max(1.0, scale * head_dim**0.5)
        return atol, rtol

    def accepts_everything(self) -> bool:
        """No restriction on calls without the later arguments: every field that restricts what can be served is
        at ACCEPT_ALL's value (priority, tolerances and serving more restrict nothing)."""
        return all(getattr(self, name) == getattr(ACCEPT_ALL, name) for name in _RESTRICTING)


ACCEPT_ALL = Capabilities()
# How a backend serves (its rank, its accuracy) and serving more than a plain call restrict nothing.
_HOW = frozenset({"priority", "tolerance", "deterministic", "tolerance_grows_with_logits"})
_MORE = frozenset({"softcap", "window", "sinks", "return_lse", "lse_grad"})
_RESTRICTING = tuple(f.name for f in dataclasses.fields(Capabilities) if f.name not in _HOW | _MORE)


def capability_reasons(caps: Capabilities, call: CallSpec) -> list[str]:
    """Every reason ``caps`` cannot serve ``call``, each a sentence a user can act on. Empty = can serve."""
    reasons: list[str] = []
    if caps.devices is not None and call.device_type not in caps.devices:
        reasons.append(f"runs on {'/'.join(sorted(caps.devices))}, got tensors on {call.device_type}")
    elif call.device_type == "cuda" and (caps.min_compute_capability or caps.max_compute_capability):
        cc = compute_capability(call.device_index)
        low, high = caps.min_compute_capability, caps.max_compute_capability
        if low and cc < low:
            reasons.append(f"needs compute capability >= {low[0]}.{low[1]}, found {cc[0]}.{cc[1]}")
        if high and cc > high:
            reasons.append(f"runs on compute capability <= {high[0]}.{high[1]}, found {cc[0]}.{cc[1]}")
    if caps.dtypes is not None and call.dtype not in caps.dtypes:
        names = ", ".join(sorted(dtype_name(d) for d in caps.dtypes))
        reasons.append(f"needs dtype {names}, got {dtype_name(call.dtype)} (cast the model, or use native)")
    if call.head_dim < caps.min_head_dim:
        reasons.append(f"head_dim {call.head_dim} < {caps.min_head_dim}")
    if caps.max_head_dim is not None and max(call.head_dim, call.head_dim_v) > caps.max_head_dim:
        reasons.append(f"head_dim {max(call.head_dim, call.head_dim_v)} > {caps.max_head_dim}")
    if caps.head_dim_multiple > 1 and call.head_dim % caps.head_dim_multiple:
        reasons.append(f"head_dim {call.head_dim} is not a multiple of {caps.head_dim_multiple}")
    if caps.same_v_head_dim and call.head_dim_v != call.head_dim:
        reasons.append(f"value head_dim {call.head_dim_v} != query head_dim {call.head_dim}")
    if call.mask_kind not in caps.masks:
        served = sorted(caps.masks - {MASK_NONE}) or ["none"]
        reasons.append(f"does not take a {call.mask_kind.replace('_', '-')} attn_mask (takes: {', '.join(served)})")
    if call.is_causal and not caps.causal:
        reasons.append("has no causal mode")
    if call.seq_q != call.seq_kv:
        if not caps.cross:
            reasons.append(f"needs seq_q == seq_kv, got {call.seq_q} != {call.seq_kv}")
        elif call.is_causal and not caps.causal_cross:
            reasons.append(
                f"aligns causal masks bottom-right, SDPA top-left: they differ when seq_q {call.seq_q} != "
                f"seq_kv {call.seq_kv}"
            )
    if call.heads_kv != call.heads_q and not caps.gqa:
        reasons.append(f"no GQA/MQA ({call.heads_q} query heads, {call.heads_kv} key/value heads)")
    if call.dropout and not caps.dropout:
        reasons.append("no dropout (dropout_p > 0)")
    if call.custom_scale and not caps.scale:
        reasons.append("ignores a custom softmax scale")
    if call.needs_grad and not caps.backward:
        reasons.append("has no backward pass (inputs require grad)")
    if call.compiling and not caps.compile_safe:
        reasons.append("is not torch.compile-safe")
    if call.softcap or call.window or call.sinks or call.return_lse:
        reasons.extend(_extra_reasons(caps, call))
    return reasons


def _extra_reasons(caps: Capabilities, call: CallSpec) -> list[str]:
    # The later arguments (softcap, window, sinks, return_lse), each named as the user passed it.
    reasons = []
    if call.softcap and not caps.softcap:
        reasons.append("has no logit soft-capping (softcap=...): use a backend that declares softcap")
    if call.window and not caps.window:
        reasons.append("has no sliding window (window=...): use a backend that declares window")
    elif call.window and call.seq_q != call.seq_kv and not caps.causal_cross:
        reasons.append(
            f"aligns windows bottom-right, SDPA top-left: they differ when seq_q {call.seq_q} != seq_kv {call.seq_kv}"
        )
    if call.sinks and not caps.sinks:
        reasons.append("has no attention sinks (sinks=...): use a backend that declares sinks")
    if call.return_lse and not caps.return_lse:
        reasons.append("does not return the log-sum-exp (return_lse=True): use a backend that declares return_lse")
    elif call.return_lse and call.needs_grad and not caps.lse_grad:
        reasons.append("returns a log-sum-exp without a gradient (return_lse=True while inputs require grad)")
    return reasons


def compute_capability(index: int | None) -> tuple[int, int]:
    """(major, minor) of CUDA device ``index``; the emulated capability while one is emulated."""
    capability = emulated()[1]
    if capability is not None:
        return capability
    return _device_capability(index)


@functools.cache
def _device_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
