"""Contract tests of torch_xla: the scale diffusers drops (fakes of the library; see kernel_setup.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fakes import (
    fake_torch_xla,
)
from kernel_setup import assert_matches, expected, qkv

from attnpatch.core import dispatch


@pytest.mark.parametrize("scale", [None, 0.3])
def test_xla_honours_scale(scale: float | None, fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("xla")
    q, k, v = qkv(dtype=torch.float32, heads_kv=2, seq_q=8, seq_kv=12)
    out = dispatch.dispatch_attention(q, k, v, scale=scale, is_causal=True, backend="_native_xla")
    assert_matches(out, expected(q, k, v, scale=scale, is_causal=True))
    (call,) = fake_torch_xla.calls
    assert call["sm_scale"] == (scale if scale is not None else 64**-0.5)
    assert call["q"][0] == (2, 4, 8, 64) and call["k"][0] == (2, 4, 12, 64), "(B, H, S, D), key heads repeated"


def test_xla_2_2_without_sm_scale(
    fake_libraries: Any, pretend: Any, strict: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake_torch_xla, "flash_attention", fake_torch_xla.flash_attention_2_2)
    pretend("xla")
    q, k, v = qkv(dtype=torch.float32)
    out = dispatch.dispatch_attention(q, k, v, scale=0.3, backend="_native_xla")
    assert_matches(out, expected(q, k, v, scale=0.3))
    assert fake_torch_xla.calls[0]["sm_scale"] == 1.0, "the old kernel's implicit scale; q carried the real one"
