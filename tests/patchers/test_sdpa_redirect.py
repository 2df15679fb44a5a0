"""The scoped SDPA redirect (attnpatch/patchers/sdpa.py): who it sends to the dispatcher, and what pauses it."""

from __future__ import annotations

import pytest
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


def _legacy_layer() -> torch.nn.Module:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    layer = Attention(query_dim=16, heads=2, dim_head=8).eval()
    layer.set_processor(AttnProcessor2_0())
    return layer


@pytest.mark.parametrize("replaced_before", [False, True], ids=["torch-sdpa-on-F", "a-function-on-F-before-us"])
def test_a_layer_on_native_runs_torch_sdpa_as_written_and_any_other_selection_is_routed(replaced_before: bool) -> None:
    # A native layer's SDPA calls reach torch's SDPA as the processor wrote them: not the dispatcher, and not a
    # function someone put on F before attnpatch either (native means torch's SDPA).
    pytest.importorskip("diffusers")
    import attnpatch
    from attnpatch.core import registry

    seen: list[str] = []

    def earlier(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append("earlier")
        return TORCH_SDPA(*args, **kwargs)  # type: ignore[arg-type]

    def mine(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):  # type: ignore[no-untyped-def]
        seen.append("mine")
        return TORCH_SDPA(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask).transpose(1, 2)

    registry.register_backend("mine", mine)
    records: list[hooks.CallRecord] = []
    hidden = torch.randn(1, 5, 16)
    layer = _legacy_layer()
    reference = layer(hidden)
    if replaced_before:
        F.scaled_dot_product_attention = earlier
    try:
        attnpatch.apply(layer, backend="native")
        try:
            torch.testing.assert_close(layer(hidden), reference, rtol=0, atol=0)
            assert seen == [] and F.scaled_dot_product_attention is not earlier
            hooks.add_observer(records.append)  # an observer must see every call: routed again
            try:
                torch.testing.assert_close(layer(hidden), reference, rtol=0, atol=0)
            finally:
                hooks.remove_observer(records.append)
            assert [r.served for r in records] == ["native"] and seen == []
            attnpatch.apply(layer, backend="mine")
            torch.testing.assert_close(layer(hidden), reference)
            assert seen == ["mine"]
        finally:
            attnpatch.unapply(layer)
        layer(hidden)  # unpatched again: the function from before attnpatch is back
        assert seen == ["mine", "earlier"] if replaced_before else seen == ["mine"]
    finally:
        F.scaled_dot_product_attention = TORCH_SDPA
        registry.unregister_backend("mine")
