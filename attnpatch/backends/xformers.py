"""xFormers ``memory_efficient_attention`` (xformers >= 0.0.29), every mask kind as an ``attn_bias``.

From xformers/ops/fmha/__init__.py and common.py:

- Inputs are ``[B, M, H, K]`` (the dispatcher's layout) with stride 1 in the last dim. GQA/MQA is the 5-D
  ``[B, M, G, H, K]`` form with key/value expanded (stride 0) over H, which costs no copy.
- ``attn_bias``: ``LowerTriangularMask()`` is causal aligned top-left ("a query Q cannot attend to a key which is
  farther from the initial key than Q is from the initial query"), like SDPA, also when M_q != M_kv. Any other mask
  is a tensor bias of the query's dtype, shape ``[B, H, Mq, Mkv]`` (``[B, G, H, Mq, Mkv]`` for GQA), which may be
  expanded, but whose strides must be multiples of 8 (16 bytes): "To use an `attn_bias` with a sequence length that
  is not a multiple of 8, you need to ensure memory is aligned by slicing a bigger tensor". So the bias is built in
  storage padded to a multiple of 8 keys and sliced.
- ``p`` (dropout), ``scale``, a backward pass; "This operator may be nondeterministic".
- f16, bf16 and f32 on NVIDIA GPUs; bf16 only on sm80+ (its ``supports()`` rejects it below).
A query row whose keys are all masked comes out of the kernel as NaN; it is set to 0 here like everywhere else.

Whether an operator exists for a call is xFormers' own answer (:func:`operator_reasons`, asked of its dispatcher
without running anything): head dims not a multiple of 8 in fp16/bf16, bf16 below sm80, and from 0.0.33 on
compute capability > 9.0 fp32, tensor biases and causal with seq_q != seq_kv have none; GQA has no backward
operator (docs/kernel-facts.md).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from attnpatch.backends import _extras, _probe
from attnpatch.backends._define import define
from attnpatch.core import masks
from attnpatch.core.call import ALL_MASKS, MASK_NONE, CallSpec, SdpaArgs
from attnpatch.core.capabilities import Capabilities

if TYPE_CHECKING:
    from typing_extensions import Unpack

XFORMERS_VERSION = "0.0.29"
ALIGNMENT = 8  # keys; 16 bytes of fp16/bf16 (fp32 needs 4, which 8 satisfies)


def xformers_kernel(*args: Unpack[SdpaArgs]) -> torch.Tensor:
    """memory_efficient_attention on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""
    query, key, value, attn_mask, dropout_p, is_causal, scale, _ = args
    ops = _probe.lib("xformers.ops")
    heads, heads_kv = query.shape[2], key.shape[2]
    query, key, value = (_probe.last_dim_contiguous(t) for t in (query, key, value))
    groups = heads_kv if heads_kv != heads else None
    if groups is not None:
        per_group = heads // heads_kv
        query = query.unflatten(2, (heads_kv, per_group))
        key = key.unsqueeze(3).expand(-1, -1, -1, per_group, -1)
        value = value.unsqueeze(3).expand(-1, -1, -1, per_group, -1)
    bias: object = None
    if is_causal:
        bias = ops.LowerTriangularMask()
    elif attn_mask is not None:
        bias = aligned_bias(attn_mask, query.dtype, query.shape[0], heads, query.shape[1], key.shape[1], groups)
    out = ops.memory_efficient_attention(query, key, value, attn_bias=bias, p=dropout_p, scale=scale)
    if groups is not None:
        out = out.flatten(2, 3)
    return masks.zero_fully_masked(out, attn_mask)


def aligned_bias(
    attn_mask: torch.Tensor,
    dtype: torch.dtype,
    batch: int,
    heads: int,
    seq_q: int,
    seq_kv: int,
    groups: int | None,
) -> torch.Tensor:
    """The normalised mask (batch|1, 1|heads, seq_q|1, seq_kv) as an xFormers tensor bias.

    Stored once at its own (broadcast) size in a buffer whose last dim is padded to a multiple of 8, then sliced
    and expanded to (batch, heads, seq_q, seq_kv), or (batch, groups, heads // groups, seq_q, seq_kv) for GQA.
    Expanded dims have stride 0, which satisfies the alignment rule.
    """
    b, h, q, _ = attn_mask.shape
    padded = -(-seq_kv // ALIGNMENT) * ALIGNMENT
    bias = torch.empty((b, h, q, padded), dtype=dtype, device=attn_mask.device)[..., :seq_kv]
    bias.copy_(masks.to_additive(attn_mask, dtype))
    bias = bias.expand(batch, heads, seq_q, seq_kv)
    return bias if groups is None else bias.unflatten(1, (groups, heads // groups))


def _bfloat16_needs_sm80(call: CallSpec) -> list[str]:
    if call.dtype == torch.bfloat16 and call.device_type == "cuda":
        cc = _probe.compute_capability(call.device_index)
        if cc < (8, 0):
            return [f"xformers runs bfloat16 on compute capability >= 8.0 only, found {cc[0]}.{cc[1]}"]
    return []


# ----- asking xFormers' own dispatcher which operator would serve a call -----------------------------------------


class _ShapeOnly(torch.Tensor):
    """A tensor with a shape, strides, dtype and device, and no storage: all xFormers' checks read of a call.

    A meta tensor would report the device "meta"; this one reports the call's device without allocating there
    (a 32k-token call is asked about for free, and an emulated device works too). Any operation on it raises, so
    a check that starts computing fails loudly instead of quietly answering something else.
    """

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Any:
        return torch.Tensor._make_wrapper_subclass(cls, shape, strides=strides, dtype=dtype, device=device)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        raise RuntimeError(f"{func} called on a shape-only tensor made to ask xFormers about a call")


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _inputs(call: CallSpec) -> Any:
    """The ``xformers.ops.fmha.Inputs`` that ``xformers_kernel`` passes for ``call``, at batch 1 and without data.

    The kernel's layouts: (1, seq, heads, head_dim), or for GQA (1, seq, heads_kv, heads_q // heads_kv, head_dim)
    with key/value expanded (stride 0) over the last head dim; causal as ``LowerTriangularMask()`` (top-left); any
    mask as a plain tensor bias in the query's dtype whose rows are padded to a multiple of 8 keys.
    """
    fmha = _probe.lib("xformers.ops.fmha")
    device = torch.device(call.device_type, 0 if call.device_index is None else call.device_index)
    dtype, heads, heads_kv = call.dtype, call.heads_q, call.heads_kv
    per_group = heads // heads_kv
    bias_strides = _strides((1, heads, call.seq_q, -(-call.seq_kv // ALIGNMENT) * ALIGNMENT))
    if per_group == 1:
        q_shape: tuple[int, ...] = (1, call.seq_q, heads, call.head_dim)
        bias_shape: tuple[int, ...] = (1, heads, call.seq_q, call.seq_kv)
    else:
        q_shape = (1, call.seq_q, heads_kv, per_group, call.head_dim)
        bias_shape = (1, heads_kv, per_group, call.seq_q, call.seq_kv)
        bias_strides = (bias_strides[0], bias_strides[1] * per_group, *bias_strides[1:])

    def key_like(head_dim: int) -> _ShapeOnly:
        s = _strides((1, call.seq_kv, heads_kv, head_dim))
        if per_group == 1:
            return _ShapeOnly((1, call.seq_kv, heads_kv, head_dim), s, dtype, device)
        shape = (1, call.seq_kv, heads_kv, per_group, head_dim)
        return _ShapeOnly(shape, (s[0], s[1], s[2], 0, s[3]), dtype, device)

    attn_bias: Any = None
    if call.is_causal:
        attn_bias = fmha.attn_bias.LowerTriangularMask()
    elif call.mask_kind != MASK_NONE or call.window:  # a window is folded into the mask
        # xFormers requires type(bias) is torch.Tensor (a subclass is refused) and reads only its dtype and strides.
        attn_bias = torch.empty_strided(bias_shape, bias_strides, dtype=dtype, device="meta")
    return fmha.Inputs(
        query=_ShapeOnly(q_shape, _strides(q_shape), dtype, device),
        key=key_like(call.head_dim),
        value=key_like(call.head_dim_v),
        attn_bias=attn_bias,
        p=0.1 if call.dropout else 0.0,
        scale=0.125 if call.custom_scale else None,
    )


def _refusals(direction: str, message: str) -> list[str]:
    """xFormers' "No operator found for ..." message as one line per operator it tried."""
    reasons: list[str] = []
    for line in message.splitlines():
        if line.startswith("`") and line.endswith("is not supported because:"):
            reasons.append(f"xformers {direction} operator {line[1:].split('`', 1)[0]}:")
        elif reasons and line.startswith("    ") and not line.strip().startswith("HINT"):
            reasons[-1] += f" {line.strip()};"
    # If a future xFormers words the message differently, the whole message is still the reason.
    return [reason.rstrip(";") for reason in reasons] or [f"xformers {direction}: {' '.join(message.split())}"]


def operator_reasons(call: CallSpec) -> list[str]:
    """xFormers' own reasons why none of its operators serves ``call``; [] when one does.

    Asks ``xformers.ops.fmha.dispatch`` what ``memory_efficient_attention`` would ask it (``_dispatch_fw``, and
    ``_dispatch_bw`` when the call needs gradients), on shape-only tensors laid out as ``xformers_kernel`` lays
    them out: nothing runs, nothing is allocated. xFormers reads the rest itself (torch.cuda.get_device_capability,
    torch.version.cuda/hip, its build, torch.are_deterministic_algorithms_enabled()), so the answer is the one the
    call would get. 40-110 us; not cached here: the dispatcher caches reasons per call kind and forgets them when
    the registry changes (device emulation included).
    """
    reasons: list[str] = []
    try:
        fmha = _probe.lib("xformers.ops.fmha")
        inputs = _inputs(call)
        try:
            fmha.dispatch._dispatch_fw(inputs, call.needs_grad)
        except NotImplementedError as exc:
            reasons += _refusals("forward", str(exc))
        if call.needs_grad:
            try:
                fmha.dispatch._dispatch_bw(inputs, None)  # None: no varlen bias, so no LSE layout to match
            except NotImplementedError as exc:
                reasons += _refusals("backward", str(exc))
    except Exception as exc:  # a check that cannot run refuses with its cause instead of crashing the model
        return [f"xformers could not check this call ({type(exc).__name__}: {exc})"]
    return reasons


@_probe.constant_for_compile
def _operator_reasons_of(*fields: Any) -> list[str]:
    return operator_reasons(CallSpec(*fields))


def _operator_check(call: CallSpec) -> list[str]:
    # torch.compile calls a constant_for_compile function eagerly instead of tracing into xFormers, but only
    # with arguments it holds as constants: a CallSpec's fields are, the CallSpec object is not (torch 2.13 fails
    # with "InternalTorchDynamoError: AttributeError"). The tensor subclass needs __torch_dispatch__ there too.
    return _operator_reasons_of(*(getattr(call, field.name) for field in dataclasses.fields(call)))


define(
    "xformers",
    xformers_kernel,
    family="xformers",
    caps=Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        masks=ALL_MASKS,
        deterministic=False,
        priority=35,
        window=True,  # folded into the mask
    ),
    requires=_probe.requires("xformers", "xformers", XFORMERS_VERSION),
    # Our own bf16 reason first (the clearest line); then xFormers' verdict, which covers it and everything else.
    check=_probe.library_check("xformers.ops", _bfloat16_needs_sm80, _operator_check),
    description="xformers.ops.memory_efficient_attention; every mask as an aligned attn_bias",
    kernel=True,
    extra_fn=_extras.window_as_mask(xformers_kernel),  # a window as the mask it becomes (top-left)
    aliases=("xformers_attn", "mem_efficient_xformers"),
)
