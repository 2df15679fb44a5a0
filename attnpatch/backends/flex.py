"""FlexAttention (torch.nn.attention.flex_attention), compiled.

Eager flex_attention is a slow reference implementation, so this backend always runs the compiled kernel
(Triton on CUDA, C++ on CPU). Causality and sliding windows become a BlockMask (cached per shape, window and
device, so fully masked blocks are skipped); other masks become a score_mod that adds the normalised mask, after
the soft-capping (``softcap * tanh(score / softcap)``, on the scaled score flex passes to score_mod). The lse comes
from ``return_aux=AuxRequest(lse=True)`` (torch 2.13: (B, H, Sq), converted from the kernel's base 2 to natural
log in flex_attention.py; its backward takes the lse's gradient), and sinks from it (out * sigmoid(lse - sink)).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from attnpatch.backends import _extras
from attnpatch.backends._define import define
from attnpatch.core import masks
from attnpatch.core.call import CallSpec
from attnpatch.core.capabilities import Capabilities


@functools.cache
def _compiled() -> Callable[..., Any]:
    return torch.compile(flex_attention)  # static first; automatic dynamic shapes on the first new shape


def _causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return q_idx >= kv_idx  # top-left aligned, like SDPA's is_causal


def _make_causal_block_mask(seq_q: int, seq_kv: int, device: str) -> Any:
    return create_block_mask(_causal, None, None, seq_q, seq_kv, device=device)


_causal_block_mask = functools.lru_cache(maxsize=64)(_make_causal_block_mask)


def _make_window_block_mask(left: int, right: int, seq_q: int, seq_kv: int, device: str) -> Any:
    # Query i attends key j iff i - left <= j <= i + right, top-left aligned; -1 = unbounded on that side.
    def window(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        keep = q_idx >= 0  # all True, in the index tensors' shape
        if left >= 0:
            keep = keep & (kv_idx >= q_idx - left)
        if right >= 0:
            keep = keep & (kv_idx <= q_idx + right)
        return keep

    return create_block_mask(window, None, None, seq_q, seq_kv, device=device)


_window_block_mask = functools.lru_cache(maxsize=64)(_make_window_block_mask)


@functools.lru_cache(maxsize=16)
def _scalar(value: float, device: str) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


def flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    *,
    softcap: float | None = None,
    window: tuple[int, int] | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
) -> Any:
    """Compiled flex_attention on (batch, seq, heads, head_dim) tensors; see the module docstring.

    Returns out (batch, seq_q, heads, head_dim_v), with ``return_lse`` (out, lse (batch, seq_q, heads) float32).
    """
    if 0 in (query.shape[0], query.shape[1], key.shape[1]):
        # Nothing to compute, and flex's compiled kernel dies on it (seq_kv 0: "Floating point exception", which
        # kills the interpreter; batch 0 with a mask: IndexError). Rows with no key to attend are 0, as everywhere.
        out = query.new_zeros((*query.shape[:3], value.shape[-1]))
        return (out, query.new_full(query.shape[:3], float("-inf"), dtype=torch.float32)) if return_lse else out
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    batch, heads, seq_q, _ = q.shape
    seq_kv = k.shape[2]
    score_mod = None
    block_mask = None
    bias = None
    # Inside an outer torch.compile the caches below cannot be traced; the outer compile compiles flex anyway.
    compiling = torch.compiler.is_compiling()
    if attn_mask is not None or softcap is not None:
        bias = (
            None
            if attn_mask is None
            else masks.to_additive(attn_mask, torch.float32).expand(batch, heads, seq_q, seq_kv)
        )
        # A tensor, not the float: a float captured by score_mod becomes a symbolic value once it changes between
        # calls (automatic dynamic), which flex's lowering rejects ("unbacked_bindings", torch 2.13 on CPU).
        # Inside an outer torch.compile the float is a constant of that trace (a tensor made there fails flex's CPU
        # lowering: "NoValidChoicesError").
        cap = softcap if softcap is None or compiling else _scalar(softcap, str(q.device))

        def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            if cap is not None:
                score = cap * torch.tanh(score / cap)
            return score if bias is None else score + bias[b, h, q_idx, kv_idx]

    if window is not None:
        if is_causal:  # causal and a window (left, right): the window (left, 0)
            window = (window[0], 0)
        make_window: Callable[..., Any] = _make_window_block_mask if compiling else _window_block_mask
        block_mask = make_window(*window, seq_q, seq_kv, str(q.device))
    elif attn_mask is None and is_causal:
        make: Callable[..., Any] = _make_causal_block_mask if compiling else _causal_block_mask
        block_mask = make(seq_q, seq_kv, str(q.device))
    kernel = cast(Callable[..., Any], flex_attention) if compiling else _compiled()
    if not compiling and q.device.type == "cpu":
        # torch 2.13's CPU flex template with a captured tensor (the mask bias) fails to build once the heads count
        # turns dynamic ("'cur_qSplitSize8' was not declared", docs/kernel-facts.md): heads stay static, one compile
        # per heads count (a model has one or two); batch and lengths still go dynamic.
        for tensor in (q, k, v) if bias is None else (q, k, v, bias):
            torch._dynamo.mark_static(tensor, 1)
    aux = AuxRequest(lse=True) if return_lse or sinks is not None else None
    result = kernel(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != heads, return_aux=aux
    )
    if aux is None:
        return masks.zero_fully_masked(result.transpose(1, 2), attn_mask)
    out, lse = result[0].transpose(1, 2), _extras.lse_bhs(result[1].lse, _extras.empty_rows(attn_mask))
    out = masks.zero_fully_masked(out, attn_mask)
    if sinks is not None:
        out = _extras.add_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out


def _device_reasons(call: CallSpec) -> list[str]:
    # Capabilities per device: torch has no FlexAttention backward on CPU ("FlexAttention does not support backward
    # on CPU", torch 2.13), so a CPU call that needs gradients goes elsewhere, and no lse there.
    if call.device_type != "cpu":
        return []
    reasons = []
    if call.needs_grad:
        reasons.append("FlexAttention has no backward pass on CPU (inputs require grad)")
    if call.return_lse or call.sinks:
        # torch 2.13 inductor/kernel/flex/flex_cpu.py: "torch.compile on CPU only supports inference and
        # `return_lse` is not supported yet"; sinks are served from the lse.
        reasons.append("FlexAttention's CPU kernel returns no lse (return_lse, sinks)")
    return reasons


define(
    "flex",
    flex,
    family="flex",
    caps=Capabilities(
        devices=frozenset({"cpu", "cuda", "xpu"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        min_head_dim=1,
        dropout=False,
        priority=5,
        softcap=True,
        window=True,
        sinks=True,
        return_lse=True,
        lse_grad=True,  # its backward takes the lse's gradient (grad_logsumexp in _higher_order_ops/flex_attention.py)
    ),
    check=lambda call: _device_reasons(call),
    description="torch FlexAttention, compiled (BlockMask for causal, score_mod for masks)",
    aliases=("flex_attn", "flex_attention", "flexattention"),
)
