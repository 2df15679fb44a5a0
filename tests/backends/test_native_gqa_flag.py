"""``native`` always hands torch's SDPA ``enable_gqa=True`` (reading both heads counts costs more, per call).

That is only sound if the flag changes nothing where the heads are equal: the same kernel chosen, the same
output. torch says so in its source (sdp_utils_cpp.h ``check_batch_size_and_num_heads_dense`` and the math
kernel's ``pre_process_group_query_attention_input`` return early for equal heads); these tests check it on the
installed torch's CPU kernels, over the kinds of call that pick different kernels. benchmarks/gpu_check.py checks
the CUDA choice.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import attnpatch
from attnpatch.backends import native

# (dtype, head_dim, mask, causal, dropout, grad): each changes which CPU kernel torch's chooser picks (the flash
# kernel or math; test_the_grid_reaches_both_cpu_kernels). SDPA takes no attn_mask with is_causal.
CALLS = [
    call
    for call in itertools.product(
        (torch.float32, torch.bfloat16, torch.float64),
        (16, 24),
        (None, "bool", "additive"),
        (False, True),
        (0.0, 0.5),
        (False, True),
    )
    if call[2] is None or not call[3]
]


def _inputs(dtype: torch.dtype, head_dim: int, mask_kind: str | None, grad: bool, heads_kv: int = 4):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 13, head_dim, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(2, heads_kv, 13, head_dim, dtype=dtype, requires_grad=grad) for _ in range(2))
    mask = None
    if mask_kind is not None:
        keep = torch.rand(2, 1, 13, 13) > 0.3
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, -1e4)
    return q, k, v, mask


@pytest.mark.parametrize(("dtype", "head_dim", "mask_kind", "causal", "dropout", "grad"), CALLS)
def test_the_flag_picks_the_same_cpu_kernel_for_equal_heads(dtype, head_dim, mask_kind, causal, dropout, grad) -> None:
    q, k, v, mask = _inputs(dtype, head_dim, mask_kind, grad)
    call = {"attn_mask": mask, "dropout_p": dropout, "is_causal": causal}
    with torch.set_grad_enabled(grad):
        chosen = torch._fused_sdp_choice(q, k, v, **call)
        assert torch._fused_sdp_choice(q, k, v, **call, enable_gqa=True) == chosen
        if dropout:
            return  # random: the kernel choice is the claim
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, **call)
        flagged = native.native_bhsd(q, k, v, mask, 0.0, causal, None, False)
    assert torch.equal(flagged, plain)
    if grad:
        grads = torch.autograd.grad(plain.sum(), (q, k, v))
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(flagged.sum(), (q, k, v)), grads, strict=True))


def test_the_grid_reaches_both_cpu_kernels() -> None:
    chosen = set()
    for dtype, head_dim, mask_kind, causal, dropout, grad in CALLS:
        q, k, v, mask = _inputs(dtype, head_dim, mask_kind, grad)
        with torch.set_grad_enabled(grad):
            chosen.add(torch._fused_sdp_choice(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal))
    assert {int(torch.nn.attention.SDPBackend.MATH), int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)} <= chosen


@pytest.mark.parametrize("heads_kv", [1, 2])
def test_native_serves_gqa_without_the_callers_flag(heads_kv: int) -> None:
    """The dispatcher's contract: heads_kv may divide heads with or without ``enable_gqa``."""
    q, k, v, _ = _inputs(torch.float64, 16, None, False, heads_kv=heads_kv)
    repeat = 4 // heads_kv
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), is_causal=True
    )
    for enable_gqa in (False, True):
        out = attnpatch.dispatch_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=enable_gqa
        )
        torch.testing.assert_close(out.transpose(1, 2), expected, rtol=1e-12, atol=1e-12)


def test_heads_that_do_not_divide_are_refused() -> None:
    q, k, v, _ = _inputs(torch.float32, 16, None, False, heads_kv=3)
    with pytest.raises(RuntimeError):
        native.native_bhsd(q, k, v, None, 0.0, False, None, False)
