"""One attention call: the facts that decide which backend can serve it, and the backend calling convention.

A backend function takes the dispatcher's arguments in its layout, the first eight positionally::

    fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, **extra) -> out
    query: (batch, seq_q, heads_q, head_dim)      key: (batch, seq_kv, heads_kv, head_dim)
    value: (batch, seq_kv, heads_kv, head_dim_v)  out: (batch, seq_q, heads_q, head_dim_v)
    attn_mask: None, or the normalised mask (batch|1, 1|heads_q, seq_q|1, seq_kv), bool (True = attend)
               or additive float in query's dtype. heads_kv may divide heads_q (GQA) whatever enable_gqa says.
    is_causal: top-left aligned, as in torch's scaled_dot_product_attention. Never set together with a mask:
               the dispatcher folds causality into the mask first.

Arguments added later (soft-capping, windows, sinks, ...) arrive as keyword arguments in ``extra``, and only to
backends whose :class:`~attnpatch.core.capabilities.Capabilities` declare them: every other backend refuses such
a call with a reason before it is made, so adding an argument never touches the backends that do not serve it.

Device emulation (:func:`emulate`, used by :func:`attnpatch.testing.emulate_device`) makes CPU tensors count as
tensors of another device type here, so the rules of a GPU backend can be checked, and its adapter run against
a library that computes on CPU (a Triton interpreter, a reference path), on a machine without that device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

BackendFn = Callable[..., torch.Tensor]

# Mask kinds after normalisation. "key_padding" is a bool mask of shape (B, 1, 1, Skv): every backend that
# takes bool masks takes it, and varlen kernels can take only it.
MASK_NONE = "none"
MASK_KEY_PADDING = "key_padding"
MASK_BOOL = "bool"
MASK_ADDITIVE = "additive"
ALL_MASKS = frozenset({MASK_NONE, MASK_KEY_PADDING, MASK_BOOL, MASK_ADDITIVE})

_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


class _Emulation:
    # Class attributes: no emulation unless emulate() set one. Process-wide on purpose (a test helper).
    device_type: str | None = None
    capability: tuple[int, int] | None = None
    rocm: bool = False


def emulate(device_type: str | None, capability: tuple[int, int] | None = None, rocm: bool = False) -> None:
    """Treat CPU tensors as tensors on device 0 of ``device_type`` (None: stop) with CUDA ``capability``; ``rocm``:
    the GPU is an AMD one (torch's device type is "cuda" there too).

    Callers also refresh the registry (availability depends on it): use :func:`attnpatch.testing.emulate_device`.
    """
    _Emulation.device_type = device_type
    _Emulation.capability = capability if device_type is not None else None
    _Emulation.rocm = rocm and device_type is not None


def emulated() -> tuple[str | None, tuple[int, int] | None]:
    """(device type, compute capability) being emulated, or (None, None)."""
    return _Emulation.device_type, _Emulation.capability


def emulated_rocm() -> bool:
    """Whether the emulated device is an AMD GPU."""
    return _Emulation.rocm


@dataclass(frozen=True)
class CallSpec:
    """The facts about one call that decide whether a backend can serve it (hashable: it keys caches)."""

    device_type: str
    device_index: int | None
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    mask_kind: str
    is_causal: bool
    dropout: bool
    custom_scale: bool
    needs_grad: bool
    compiling: bool

    @staticmethod
    def of(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask_kind: str,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
    ) -> CallSpec:
        device = query.device
        device_type, device_index = device.type, device.index
        if _Emulation.device_type is not None and device_type == "cpu":
            device_type, device_index = _Emulation.device_type, 0
        return CallSpec(
            device_type=device_type,
            device_index=device_index,
            dtype=query.dtype,
            head_dim=query.shape[-1],
            head_dim_v=value.shape[-1],
            heads_q=query.shape[2],
            heads_kv=key.shape[2],
            seq_q=query.shape[1],
            seq_kv=key.shape[1],
            mask_kind=mask_kind,
            is_causal=is_causal,
            dropout=dropout_p > 0.0,
            custom_scale=scale is not None,
            needs_grad=torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad),
            compiling=torch.compiler.is_compiling(),
        )

    def describe(self) -> str:
        """One line for messages: ``cuda float16, heads 8/2, seq 64x77, head_dim 64, mask none, causal``."""
        return (
            f"{self.device_type} {dtype_name(self.dtype)}, heads {self.heads_q}/{self.heads_kv}, "
            f"seq {self.seq_q}x{self.seq_kv}, head_dim {self.head_dim}, mask {self.mask_kind}"
            + (", causal" if self.is_causal else "")
            + (", dropout" if self.dropout else "")
        )
