"""One attention call: the facts that decide which backend can serve it, and the backend calling convention.

A backend function takes the dispatcher's arguments in its layout, the first eight positionally::

    fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, **extra) -> out | (out, lse)
    query: (batch, seq_q, heads_q, head_dim)      key: (batch, seq_kv, heads_kv, head_dim)
    value: (batch, seq_kv, heads_kv, head_dim_v)  out: (batch, seq_q, heads_q, head_dim_v)
    attn_mask: None, or the normalised mask (batch|1, 1|heads_q, seq_q|1, seq_kv), bool (True = attend)
               or additive float in query's dtype. heads_kv may divide heads_q (GQA) whatever enable_gqa says.
    is_causal: top-left aligned, as in torch's scaled_dot_product_attention. Never set together with a mask:
               the dispatcher folds causality into the mask first.

The eight are :data:`SdpaArgs`. A backend function may spell them out as parameters (``native`` does: it is on
the per-call fast path, where a tuple costs time), or take them as ``*args: Unpack[SdpaArgs]`` and unpack them
where it reads them (``query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = args``): every
internal function that only serves or passes a call on does the latter, so the convention is written here once.
Functions that a library calls by keyword (the replacements of ``F.scaled_dot_product_attention`` and of diffusers'
``dispatch_attention_fn``, diffusers' forward op) keep that library's signature.

Arguments added later arrive as keyword arguments in ``extra``, only when the call has them, and only to backends
whose :class:`~attnpatch.core.capabilities.Capabilities` declare them: every other backend refuses such a call
with a reason before it is made, so adding an argument never touches the backends that do not serve it::

    softcap: float > 0; logits s = scale * q.k become softcap * tanh(s / softcap) before the mask and softmax.
    window: (left, right), each >= 0 or -1 (unbounded), not both -1: query i attends key j iff
            i - left <= j <= i + right, top-left aligned like is_causal. is_causal is folded into it (right <= 0)
            and is then False.
    sinks: (heads_q,) logits, one per query head, that join the softmax denominator only:
           out = out_plain * sigmoid(lse - sink).
    return_lse: True; the backend returns (out, lse), lse (batch, seq_q, heads_q) float32, the natural-log
           log-sum-exp of the scaled, capped, masked logits (without the sink); rows with no key: out 0, lse -inf.

Device emulation (:func:`emulate`, used by :func:`attnpatch.testing.emulate_device`) makes CPU tensors count as
tensors of another device type here, so the rules of a GPU backend can be checked, and its adapter run against
a library that computes on CPU (a Triton interpreter, a reference path), on a machine without that device.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, TypedDict

import torch

from attnpatch.errors import CheckFailed

# The eight positional arguments of a backend function (query, key, value, attn_mask, dropout_p, is_causal, scale,
# enable_gqa), for ``*args: Unpack[SdpaArgs]`` (see the module docstring).
SdpaArgs: TypeAlias = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float, bool, float | None, bool
]
BackendFn = Callable[..., torch.Tensor]
# A backend function for calls with the later arguments: returns out, or (out, lse) with return_lse.
ExtraFn = Callable[..., Any]

# Mask kinds after normalisation. "key_padding" is a bool mask of shape (B, 1, 1, Skv): every backend that
# takes bool masks takes it, and varlen kernels can take only it.
MASK_NONE = "none"
MASK_KEY_PADDING = "key_padding"
MASK_BOOL = "bool"
MASK_ADDITIVE = "additive"
ALL_MASKS = frozenset({MASK_NONE, MASK_KEY_PADDING, MASK_BOOL, MASK_ADDITIVE})


class ExtraArgs(TypedDict, total=False):
    """The later arguments of dispatch_attention / route, keyword-only (see the module docstring)."""

    softcap: float | None
    window: tuple[int, int] | None
    sinks: torch.Tensor | None
    return_lse: bool


EXTRA_DEFAULTS: dict[str, Any] = {"softcap": None, "window": None, "sinks": None, "return_lse": False}


def check_extras(
    query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, extra: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """Validate the later arguments of one call and normalise them: (the arguments a backend gets, is_causal).

    Arguments at their 'off' value are dropped (softcap/window/sinks None, return_lse False, window (-1, -1)).
    Without a mask (the dispatcher folds is_causal into a mask first), is_causal folds into the window, which
    becomes (left, 0), and a window (-1, 0) is plain causal attention: is_causal, no window.
    """
    unknown = sorted(set(extra) - set(EXTRA_DEFAULTS))
    if unknown:
        raise TypeError(
            f"unexpected keyword argument {unknown[0]!r} for attention: the keyword-only arguments are backend, "
            f"{', '.join(EXTRA_DEFAULTS)}"
        )
    out: dict[str, Any] = {}
    softcap = extra.get("softcap")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, int | float) or not 0 < softcap < math.inf:
            raise CheckFailed(
                f"softcap={softcap!r}: soft-capping takes a finite number > 0 (e.g. 50.0 for Gemma 2); None for none"
            )
        out["softcap"] = float(softcap)
    window = extra.get("window")
    if window is not None:
        left, right = _window(window)
        if is_causal and attn_mask is None:
            right, is_causal = 0, False
        if (left, right) == (-1, 0) and attn_mask is None:
            is_causal = True
        elif (left, right) != (-1, -1):
            out["window"] = (left, right)
    sinks = extra.get("sinks")
    if sinks is not None:
        heads = query.shape[2]
        if not isinstance(sinks, torch.Tensor) or sinks.shape != (heads,) or not sinks.is_floating_point():
            shape = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
            raise CheckFailed(
                f"sinks of shape {shape}: attention sinks are a float tensor of shape (heads={heads},), one logit per "
                "query head"
            )
        if sinks.device != query.device:
            raise CheckFailed(f"sinks on {sinks.device}, query on {query.device}: move sinks to the query's device")
        out["sinks"] = sinks
    return_lse = extra.get("return_lse", False)
    if not isinstance(return_lse, bool):
        raise CheckFailed(f"return_lse={return_lse!r}: pass True or False")
    if return_lse:
        out["return_lse"] = True
    return out, is_causal


def _window(window: Any) -> tuple[int, int]:
    ok = isinstance(window, tuple | list) and len(window) == 2
    if ok and all(isinstance(side, int) and not isinstance(side, bool) and side >= -1 for side in window):
        return int(window[0]), int(window[1])
    raise CheckFailed(
        f"window={window!r}: a sliding window is (left, right), two ints >= 0, or -1 for unbounded on that side "
        "(e.g. (4095, 0) for a 4096-token causal window)"
    )


def extras_signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``fn``'s signature with its ``**extra`` spelled out as the keyword-only arguments of :class:`ExtraArgs`."""
    signature = inspect.signature(fn)
    params = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for (name, default), annotation in zip(
            EXTRA_DEFAULTS.items(),
            ("float | None", "tuple[int, int] | None", "torch.Tensor | None", "bool"),
            strict=True,
        )
    ]
    return signature.replace(parameters=params)


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
    # The later arguments: whether the call has them (see the module docstring).
    softcap: bool = False
    window: bool = False
    sinks: bool = False
    return_lse: bool = False

    @staticmethod
    def of(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask_kind: str,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
        *,
        softcap: float | None = None,
        window: tuple[int, int] | None = None,
        sinks: torch.Tensor | None = None,
        return_lse: bool = False,
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
            needs_grad=torch.is_grad_enabled()
            and (
                query.requires_grad
                or key.requires_grad
                or value.requires_grad
                or (sinks is not None and sinks.requires_grad)
            ),
            compiling=torch.compiler.is_compiling(),
            softcap=softcap is not None,
            window=window is not None,
            sinks=sinks is not None,
            return_lse=return_lse,
        )

    def describe(self) -> str:
        """One line for messages: ``cuda float16, heads 8/2, seq 64x77, head_dim 64, mask none, causal``."""
        return (
            f"{self.device_type} {dtype_name(self.dtype)}, heads {self.heads_q}/{self.heads_kv}, "
            f"seq {self.seq_q}x{self.seq_kv}, head_dim {self.head_dim}, mask {self.mask_kind}"
        ) + "".join(
            f", {word}" for word in self.flags("is_causal", "dropout", "softcap", "window", "sinks", "return_lse")
        )

    def flags(self, *names: str) -> list[str]:
        """The words for those of the boolean fields ``names`` that are set, in that order (``is_causal`` is
        "causal", ``needs_grad`` "grad", any other its own name)."""
        return [_FLAG_WORDS.get(name, name) for name in names if getattr(self, name)]


_FLAG_WORDS = {"is_causal": "causal", "needs_grad": "grad"}
