"""Contract tests of Hub kernels: opt-in, pins, offline, layouts (fakes of the library; see kernel_setup.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fakes import (
    fake_kernels,
)
from kernel_setup import assert_matches, calls_of, expected, padding_mask, qkv

from attnpatch.backends import hub
from attnpatch.core import dispatch, registry, selection
from attnpatch.errors import AttnpatchWarning, UnsupportedCall


def test_hub_needs_opt_in(fake_libraries: Any, pretend: Any) -> None:
    pretend("cuda", (8, 0))
    reasons = registry.get_backend("flash_hub").reasons
    assert any(
        "opt in with ATTNPATCH_TRUST_HUB_KERNELS=1 or attnpatch.backends.hub.trust_hub_kernels(True)" in r
        for r in reasons
    )
    q, k, v = qkv()
    with pytest.warns(AttnpatchWarning, match="downloads and runs code from the Hugging Face Hub"):
        dispatch.dispatch_attention(q, k, v, backend="flash_hub")
    assert not fake_kernels.calls, "nothing may be downloaded before the user opts in"


def test_hub_opt_in_by_environment(fake_libraries: Any, pretend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNPATCH_TRUST_HUB_KERNELS", "1")
    pretend("cuda", (8, 0))
    assert registry.get_backend("flash_hub").available


def test_hub_downloads_once_at_the_pinned_revision(
    fake_libraries: Any, pretend: Any, strict: None, trusted: None
) -> None:
    pretend("cuda", (8, 0))
    q, k, v = qkv()
    for _ in range(2):
        dispatch.dispatch_attention(q, k, v, backend="flash_hub")
    dispatch.dispatch_attention(q, k, v, attn_mask=padding_mask([12, 5], 12), backend="flash_varlen_hub")
    (download,) = calls_of(fake_kernels, "get_kernel")
    assert download["repo_id"] == "kernels-community/flash-attn2" and download["revision"] == "v3"
    assert download["trust_remote_code"] is True and download["version"] is None
    hub.pin_hub_kernel("flash_hub", "0123abcd")
    dispatch.dispatch_attention(q, k, v, backend="flash_hub")
    assert calls_of(fake_kernels, "get_kernel")[-1]["revision"] == "0123abcd"
    with pytest.raises(ValueError, match="not a Hub backend"):
        hub.pin_hub_kernel("flash", "x")


def test_hub_offline_is_a_clear_reason(fake_libraries: Any, pretend: Any, trusted: None) -> None:
    pretend("cuda", (8, 0))
    fake_kernels.OFFLINE = True
    q, k, v = qkv()
    with pytest.warns(AttnpatchWarning, match="the kernels package could not reach the Hub: LocalEntryNotFoundError"):
        out = dispatch.dispatch_attention(q, k, v, backend="flash_hub")
    assert_matches(out, expected(q, k, v))
    selection.set_strict(True)
    try:
        with pytest.raises(UnsupportedCall, match="could not reach the Hub"):
            dispatch.dispatch_attention(q, k, v, scale=0.5, backend="flash_hub")
    finally:
        selection.set_strict(False)
    assert len(calls_of(fake_kernels, "get_kernel")) == 1, "a failed download is not retried on every call"


def test_hub_sage_blackwell_layout_and_copies(fake_libraries: Any, pretend: Any, strict: None, trusted: None) -> None:
    pretend("cuda", (12, 0))
    q, k, v = qkv(dtype=torch.bfloat16, heads_kv=4)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # a view of (B, H, S, D) memory, as transformers passes
    before = k.clone()
    assert_matches(dispatch.dispatch_attention(q, k, v, backend="sage_blackwell_hub"), expected(q, k, v))
    (call,) = calls_of(fake_kernels, "sageattn3_blackwell")
    assert call["q"][0] == (2, 4, 12, 64) and call["k"][0] == (2, 4, 12, 64), "(B, H, S, D)"
    assert torch.equal(k, before), "its in-place key update must land on a copy"
    q, k, v = qkv(dtype=torch.bfloat16, heads_kv=2)
    assert_matches(dispatch.dispatch_attention(q, k, v, backend="sage_blackwell_hub"), expected(q, k, v))
    assert calls_of(fake_kernels, "sageattn3_blackwell")[-1]["k"][0] == (2, 4, 12, 64), "key heads repeated"
    q80, k80, v80 = qkv(dtype=torch.bfloat16, head_dim=96)
    with pytest.raises(UnsupportedCall, match="takes head_dim 64 or 128, got 96"):
        dispatch.dispatch_attention(q80, k80, v80, backend="sage_blackwell_hub")
