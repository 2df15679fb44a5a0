"""Contract tests of FlashAttention 2/3: argument mapping, results, causal alignment (fakes of the library; see
kernel_setup.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fakes import (
    fake_flash_attn,
    fake_flash_attn_interface,
)
from kernel_setup import assert_matches, expected, qkv

from attnpatch.core import dispatch
from attnpatch.errors import AttnpatchWarning


def test_flash_argument_mapping(
    fake_libraries: Any, pretend: Any, strict: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretend("cuda", (8, 0))
    q, k, v = qkv(heads_kv=2)
    dispatch.dispatch_attention(q, k, v, is_causal=True, scale=0.125, backend="flash")
    (call,) = fake_flash_attn.calls
    assert call["q"][0] == (2, 12, 4, 64) and call["k"][0] == (2, 12, 2, 64), "(B, S, H, D) in, key heads as given"
    assert call["softmax_scale"] == 0.125 and call["causal"] is True and call["dropout_p"] == 0.0
    assert call["window_size"] == (-1, -1) and call["softcap"] == 0.0 and call["deterministic"] is False
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    dispatch.dispatch_attention(q, k, v, backend="flash")
    assert fake_flash_attn.calls[-1]["deterministic"] is True and fake_flash_attn.calls[-1]["softmax_scale"] is None


def test_flash3_beta_tuple_result(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("cuda", (9, 0))
    fake_flash_attn_interface.BETA = True
    q, k, v = qkv(dtype=torch.bfloat16)
    assert_matches(dispatch.dispatch_attention(q, k, v, backend="_flash_3"), expected(q, k, v))


def test_flash_causal_cross_falls_back_top_left(fake_libraries: Any, pretend: Any) -> None:
    """The FlashAttention trap: its causal mask is bottom-right aligned when seq_q != seq_kv, SDPA's top-left."""
    pretend("cuda", (8, 0))
    q, k, v = qkv(seq_q=8, seq_kv=12)
    bottom_right = fake_flash_attn.flash_attn_func(q, k, v, causal=True)
    assert not torch.allclose(bottom_right, expected(q, k, v, is_causal=True), atol=1e-2), "the trap is real"
    fake_flash_attn.calls.clear()
    with pytest.warns(AttnpatchWarning, match="aligns causal masks bottom-right"):
        out = dispatch.dispatch_attention(q, k, v, is_causal=True, backend="flash")
    assert_matches(out, expected(q, k, v, is_causal=True))
    assert not fake_flash_attn.calls
    assert any(key[1] == "flash" and key[2] == "native" for key in dispatch.fallback_counts())
