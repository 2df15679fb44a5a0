"""Contract tests of torch_npu: inverted masks, causal (fakes of the library; see kernel_setup.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fakes import (
    fake_torch_npu,
)
from kernel_setup import assert_matches, bias_mask, expected, qkv

from attnpatch.core import dispatch, masks
from attnpatch.errors import UnsupportedCall


@pytest.mark.parametrize("kind", ["key_padding", "bool_4d", "bool_3d"])
def test_npu_masks_are_inverted(kind: str, fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("npu")
    q, k, v = qkv(seq_q=9, seq_kv=13)
    mask = bias_mask(kind, 2, 4, 9, 13)
    out = dispatch.dispatch_attention(q, k, v, attn_mask=mask, backend="_native_npu")
    assert_matches(out, expected(q, k, v, attn_mask=mask))
    (call,) = fake_torch_npu.calls
    normalised, _ = masks.normalize(mask, q, k)
    assert torch.equal(call["atten_mask_value"], ~normalised.expand(call["atten_mask_value"].shape))
    assert call["scale"] == 64**-0.5 and call["keep_prob"] == 1.0
    assert (call["pre_tockens"], call["next_tockens"]) == (2147483647, 2147483647)


def test_npu_causal_is_left_up(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("npu")
    q, k, v = qkv(seq_q=8, seq_kv=12, heads_kv=2)
    assert_matches(
        dispatch.dispatch_attention(q, k, v, is_causal=True, backend="_native_npu"), expected(q, k, v, is_causal=True)
    )
    assert fake_torch_npu.calls[0]["sparse_mode"] == 2


def test_npu_refuses_additive_masks(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("npu")
    q, k, v = qkv()
    with pytest.raises(UnsupportedCall, match="does not take a additive attn_mask"):
        dispatch.dispatch_attention(
            q, k, v, attn_mask=torch.zeros(2, 1, 12, 12, dtype=torch.float16), backend="_native_npu"
        )
