"""FAKE ``xformers`` / ``xformers.ops``: ``memory_efficient_attention`` with reference math and the real checks.

Installed as both ``sys.modules["xformers"]`` and ``sys.modules["xformers.ops"]``. Kept from
xformers/ops/fmha (__init__.py, common.py, attn_bias.py, cutlass.py):
- inputs [B, M, H, K], or [B, M, G, H, K] for grouped heads, last dim contiguous; f16/bf16/f32;
- ``LowerTriangularMask()``: causal aligned top-left;
- a tensor ``attn_bias`` must have exactly the attention shape (it may be expanded), the query's dtype, and
  every stride but the last a multiple of 16 bytes (``_check_bias_alignment``, with its padding HINT);
- a row whose bias is -inf everywhere comes out as NaN (nothing to normalise by).
"""

from __future__ import annotations

import types

import torch

from fakes.reference import attention, check_half, record

__version__ = "0.0.29.post1"
calls: list[dict[str, object]] = []


class LowerTriangularMask:
    """A lower triangular (causal) mask: query i attends keys 0..i, counted from the top-left corner."""


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None, output_dtype=None):
    """FAKE xformers.ops.memory_efficient_attention: query [B, Mq, (G,) H, K] -> [B, Mq, (G,) H, Kv]."""
    assert query.dim() in (4, 5), f"FAKE xformers: invalid shape for query: {tuple(query.shape)}"
    check_half(query, key, value, allowed=(torch.float16, torch.bfloat16, torch.float32))
    grouped = query.dim() == 5
    expected_bias = (
        (query.shape[0], query.shape[2], query.shape[3], query.shape[1], key.shape[1])
        if grouped
        else (query.shape[0], query.shape[2], query.shape[1], key.shape[1])
    )
    causal = None
    bias = None
    if isinstance(attn_bias, LowerTriangularMask):
        causal = "top_left"
    elif isinstance(attn_bias, torch.Tensor):
        assert tuple(attn_bias.shape) == expected_bias, (
            f"FAKE xformers: attn_bias {tuple(attn_bias.shape)} != {expected_bias}"
        )
        assert attn_bias.dtype == query.dtype, "FAKE xformers: attn_bias must have the query's dtype"
        alignment = 128 // torch.finfo(attn_bias.dtype).bits
        for d in range(attn_bias.dim() - 1):
            if attn_bias.stride(d) % alignment:
                raise ValueError(
                    f"attn_bias.stride(-2) % {alignment} != 0 (attn_bias.stride() = {attn_bias.stride()})\n"
                    "HINT: To use an `attn_bias` with a sequence length that is not a multiple of 8, you need to "
                    "ensure memory is aligned by slicing a bigger tensor."
                )
        assert attn_bias.stride(-1) <= 1, "FAKE xformers: attn_bias.stride(-1) > 1"
        bias = attn_bias
    else:
        assert attn_bias is None, f"FAKE xformers: unsupported attn_bias {type(attn_bias).__name__}"
    record(
        calls,
        "memory_efficient_attention",
        query=query,
        key=key,
        value=value,
        p=p,
        scale=scale,
        attn_bias=attn_bias if isinstance(attn_bias, torch.Tensor) else type(attn_bias).__name__,
    )
    if grouped:
        batch, seq_q, groups, heads, _ = query.shape
        query, key, value = (
            t.reshape(t.shape[0], t.shape[1], groups * heads, t.shape[-1]) for t in (query, key, value)
        )
        if bias is not None:
            bias = bias.reshape(batch, groups * heads, seq_q, bias.shape[-1])
    out = attention(query, key, value, scale=scale, causal=causal, bias=bias, dropout_p=p, empty_rows="nan")
    return out.unflatten(2, (groups, heads)) if grouped else out


# ----- xformers.ops.fmha: the operator dispatch attnpatch asks before a call ---------------------------------------
# Kept from xformers/ops/fmha (dispatch.py, common.py, flash.py, cutlass.py; 0.0.29-0.0.35): the forward operators
# tried on an NVIDIA GPU are FlashAttention-2 (``fa2F``) then CUTLASS (``cutlassF``), the backward ones ``fa2B``
# then ``cutlassB``; each answers ``not_supported_reasons``, and with none left ``_dispatch_fw`` / ``_dispatch_bw``
# raise NotImplementedError in this message format. The device's compute capability is read as xFormers reads it,
# from the device (here: the one attnpatch.testing.emulate_device emulates).


class Inputs:
    """FAKE xformers.ops.fmha.Inputs: the call, as the dispatcher sees it."""

    def __init__(self, query, key, value, attn_bias=None, p=0.0, scale=None):
        self.query, self.key, self.value, self.attn_bias, self.p, self.scale = query, key, value, attn_bias, p, scale


def _capability() -> tuple[int, int]:
    from attnpatch.core.capabilities import compute_capability

    return compute_capability(0)


def _version() -> tuple[int, ...]:
    return tuple(int(part) for part in __version__.split("+")[0].split(".")[:3] if part.isdigit())


def _common_reasons(inp: Inputs, dtypes: tuple[torch.dtype, ...]) -> list[str]:
    reasons = []
    dtype = inp.query.dtype
    if dtype not in dtypes:
        reasons.append(f"dtype={dtype} (supported: {set(dtypes)})")
    alignment = 4 if dtype == torch.float32 else 8
    if inp.query.shape[-1] % alignment or inp.value.shape[-1] % alignment:
        reasons.append(f"query.shape[-1] % {alignment} != 0")
    return reasons


def _flash_reasons(inp: Inputs, backward: bool) -> list[str]:
    reasons = _common_reasons(inp, (torch.float16, torch.bfloat16))
    if _capability() < (8, 0):
        reasons.append("requires device with capability > (8, 0) but your GPU has capability lower")
    if isinstance(inp.attn_bias, torch.Tensor):
        reasons.append("attn_bias type is <class 'torch.Tensor'>")
    if isinstance(inp.attn_bias, LowerTriangularMask) and inp.query.shape[1] != inp.key.shape[1]:
        reasons.append("Only support LowerTriangularMask if equal number ofkeys and queries")
    if inp.value.shape[-1] != inp.query.shape[-1]:
        reasons.append("query.shape[-1] != value.shape[-1]")
    if backward and inp.query.dim() == 5:
        reasons.append("operator does not support BMGHK format")
    return reasons


def _cutlass_reasons(inp: Inputs, backward: bool) -> list[str]:
    reasons = _common_reasons(inp, (torch.float16, torch.bfloat16, torch.float32))
    if inp.query.dtype == torch.bfloat16 and _capability() < (8, 0):
        reasons.append("bf16 is only supported on A100+ GPUs")
    if _version() >= (0, 0, 33) and _capability() > (9, 0):
        reasons.append("requires device with capability <= (9, 0) but your GPU has capability higher")
    if backward and inp.query.dim() == 5:
        reasons.append("operator does not support BMGHK format")
    return reasons


def _dispatch(direction: str, inp: Inputs, backward: bool) -> None:
    suffix = "B" if backward else "F"
    refusals = {f"fa2{suffix}": _flash_reasons(inp, backward), f"cutlass{suffix}": _cutlass_reasons(inp, backward)}
    if any(not reasons for reasons in refusals.values()):
        return
    lines = [f"No operator found for `memory_efficient_attention_{direction}` with inputs:"]
    lines.append(f"     query       : shape={tuple(inp.query.shape)} ({inp.query.dtype})")
    for name, reasons in refusals.items():
        lines.append(f"`{name}` is not supported because:")
        lines += [f"    {reason}" for reason in reasons]
    raise NotImplementedError("\n".join(lines))


def _dispatch_fw(inp: Inputs, needs_gradient: bool) -> None:
    """FAKE xformers.ops.fmha.dispatch._dispatch_fw: raises NotImplementedError when no forward operator serves."""
    _dispatch("forward", inp, backward=False)


def _dispatch_bw(inp: Inputs, varlen_lse_packed: object = None) -> None:
    """FAKE xformers.ops.fmha.dispatch._dispatch_bw: raises NotImplementedError when no backward operator serves."""
    _dispatch("backward", inp, backward=True)


fmha = types.ModuleType("xformers.ops.fmha", "FAKE xformers.ops.fmha (Inputs, attn_bias, dispatch)")
fmha.Inputs = Inputs
fmha.attn_bias = types.SimpleNamespace(LowerTriangularMask=LowerTriangularMask)
fmha.dispatch = types.SimpleNamespace(_dispatch_fw=_dispatch_fw, _dispatch_bw=_dispatch_bw)
