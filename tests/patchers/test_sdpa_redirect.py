"""The scoped SDPA redirect (attnpatch/patchers/sdpa.py): who it sends to the dispatcher, and what pauses it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnpatch import api
from attnpatch.core import hooks
from attnpatch.patchers import sdpa

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention  # what F.scaled_dot_product_attention is without attnpatch


def qkv(heads: int = 2, heads_kv: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(1, heads, 6, 8), torch.randn(1, heads_kv, 6, 8), torch.randn(1, heads_kv, 6, 8)


def test_only_calls_inside_a_scope_are_routed_and_native_never_comes_back() -> None:
    sdpa.acquire()
    records: list[hooks.CallRecord] = []
    hooks.add_observer(records.append)
    try:
        q, k, v = qkv(heads=4)
        plain = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        assert records == [] and not sdpa.redirecting()
        depth = sdpa.enter()
        try:
            assert sdpa.redirecting()
            routed = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        finally:
            sdpa.leave(depth)
        # One record: the SDPA call native makes for the dispatcher is not routed a second time.
        assert [r.served for r in records] == ["native"]
        torch.testing.assert_close(routed, plain, rtol=0, atol=0)
        assert not sdpa.redirecting()
    finally:
        hooks.remove_observer(records.append)
        sdpa.release()


def test_paused_puts_torch_sdpa_back_for_the_block_only() -> None:
    sdpa.acquire()
    try:
        ours = F.scaled_dot_product_attention
        assert ours is not TORCH_SDPA
        with api.sdpa_redirect_paused():
            assert F.scaled_dot_product_attention is TORCH_SDPA
        assert F.scaled_dot_product_attention is ours
    finally:
        sdpa.release()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    with api.sdpa_redirect_paused():  # not installed: nothing to pause, nothing changed
        assert F.scaled_dot_product_attention is TORCH_SDPA
