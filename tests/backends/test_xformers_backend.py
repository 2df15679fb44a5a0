"""Contract tests of xFormers: masks as aligned biases, causal alignment (fakes of the library; see kernel_setup.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fakes import (
    fake_xformers,
)
from kernel_setup import assert_matches, bias_mask, expected, padding_mask, qkv

from attnpatch.core import dispatch


@pytest.mark.parametrize("heads_kv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("kind", ["key_padding", "bool_4d", "bool_3d", "additive"])
def test_xformers_masks_become_aligned_bias(
    kind: str, heads_kv: int, fake_libraries: Any, pretend: Any, strict: None
) -> None:
    pretend("cuda", (8, 0))
    q, k, v = qkv(seq_q=9, seq_kv=13, heads_kv=heads_kv)  # 13 keys: not a multiple of 8
    mask = bias_mask(kind, 2, 4, 9, 13)
    if kind == "additive":
        mask = mask.to(torch.float16)
    out = dispatch.dispatch_attention(q, k, v, attn_mask=mask, backend="xformers")
    assert_matches(out, expected(q, k, v, attn_mask=mask))
    (call,) = fake_xformers.calls
    shape, dtype, stride = call["attn_bias"]
    assert dtype == torch.float16 and all(s % 8 == 0 for s in stride[:-1])
    assert len(shape) == (4 if heads_kv == 4 else 5)


def test_xformers_causal_is_top_left(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("cuda", (8, 0))
    q, k, v = qkv(seq_q=8, seq_kv=12, heads_kv=2)
    out = dispatch.dispatch_attention(q, k, v, is_causal=True, backend="xformers")
    assert_matches(out, expected(q, k, v, is_causal=True))
    assert fake_xformers.calls[0]["attn_bias"] == "LowerTriangularMask"


def test_xformers_causal_with_mask_folds_into_bias(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("cuda", (8, 0))
    q, k, v = qkv(seq_q=8, seq_kv=8)
    keep = padding_mask([8, 3], 8)
    out = dispatch.dispatch_attention(q, k, v, attn_mask=keep, is_causal=True, backend="xformers")
    assert_matches(out, expected(q, k, v, attn_mask=keep, is_causal=True))
