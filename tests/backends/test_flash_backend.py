"""Contract tests of FlashAttention 2/3/4: argument mapping, results, causal alignment (fakes of the library; see
kernel_setup.py)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import torch
from fakes import (
    fake_flash_attn,
    fake_flash_attn_cute,
    fake_flash_attn_interface,
)
from kernel_setup import assert_matches, expected, qkv

from attnpatch.backends import flash
from attnpatch.core import dispatch, registry
from attnpatch.core.call import CallSpec
from attnpatch.errors import AttnpatchWarning, UnsupportedCall


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


@pytest.mark.parametrize(
    ("capability", "served"), [((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True), ((10, 0), False)]
)
def test_flash3_runs_on_ampere_and_hopper(
    capability: tuple[int, int], served: bool, fake_libraries: Any, pretend: Any, strict: None
) -> None:
    """hopper/flash_api.cpp (v2.8.3): major >= 8, sm80 kernels built, sm_90a code above: no image for sm100."""
    pretend("cuda", capability)
    q, k, v = qkv(dtype=torch.bfloat16)
    if served:
        assert_matches(dispatch.dispatch_attention(q, k, v, backend="_flash_3"), expected(q, k, v))
        return
    with pytest.raises(UnsupportedCall, match=re.escape("runs on compute capability <= 9.0, found 10.0")):
        dispatch.dispatch_attention(q, k, v, backend="_flash_3")


# ----- FlashAttention-4 (flash_attn.cute, pip flash-attn-4) -------------------------------------------------------


def test_flash4_and_its_hub_twin_share_one_declaration() -> None:
    pip, twin = registry.get_backend("flash_4"), registry.get_backend("flash_4_hub")
    assert dataclasses.replace(pip.caps, priority=0) == twin.caps == dataclasses.replace(flash.FA4, priority=0)
    assert pip.caps.priority == 58 and pip.fn.__doc__ == twin.fn.__doc__


def test_flash4_argument_mapping(fake_libraries: Any, pretend: Any, strict: None) -> None:
    """Its 4th positional is qv (a scale passed positionally would land there); it returns (out, lse)."""
    pretend("cuda", (10, 0))
    q, k, v = qkv(dtype=torch.bfloat16, heads_kv=2)
    out = dispatch.dispatch_attention(q, k, v, is_causal=True, scale=0.2, backend="flash_4")
    assert_matches(out, expected(q, k, v, is_causal=True, scale=0.2))
    (call,) = fake_flash_attn_cute.calls
    assert call["softmax_scale"] == 0.2 and call["causal"] is True and call["return_lse"] is False
    assert call["q"][0] == (2, 12, 4, 64) and call["k"][0] == (2, 12, 2, 64), "(B, S, H, D) in, key heads as given"
    assert isinstance(fake_flash_attn_cute.flash_attn_func(q, k, v), tuple), "the fake mirrors the real result"
    with pytest.raises(AssertionError, match="qv must be a tensor"):
        fake_flash_attn_cute.flash_attn_func(q, k, v, 0.2)


@pytest.mark.parametrize("release", ["4.0.0b4", "0.0.1"])  # 0.0.1: the placeholder on PyPI
def test_flash4_version_too_old(
    release: str, fake_libraries: Any, pretend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b3/b4 run forward on 9.x-11.x only and do not check head dims (read from the wheels)."""
    monkeypatch.setattr(flash, "flash4_release", lambda: release)
    pretend("cuda", (10, 0))
    assert registry.get_backend("flash_4").reasons[0] == (
        f"flash-attn-4 version {release} < 4.0.0b5: pip install -U 'flash-attn-4>=4.0.0b5'"
    )


def _fa4_serves(capability: tuple[int, int], dims: tuple[int, int]) -> bool:
    """Whether the fake (FA4 4.0.0b40's checks) accepts the call on this GPU."""
    q = torch.randn(1, 4, 2, dims[0], dtype=torch.bfloat16)
    v = torch.randn(1, 4, 2, dims[1], dtype=torch.bfloat16)
    try:
        fake_flash_attn_cute.flash_attn_func(q, q, v)
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("major", [9, 10, 11])
def test_flash4_head_dims_are_those_of_its_release(
    major: int, fake_libraries: Any, pretend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every head-dim pair the fake of 4.0.0b40 (its _validate_head_dims) takes, attnpatch serves, and no other."""
    monkeypatch.setattr(flash, "flash4_release", lambda: "4.0.0b40")
    pretend("cuda", (major, 0))
    backend = registry.get_backend("flash_4")
    sizes = (8, 12, 16, 64, 96, 128, 136, 192, 256, 264, 512)
    for dims in [(d, d) for d in sizes] + [(192, 128), (64, 512), (128, 64), (256, 128), (96, 512)]:
        q = torch.zeros(1, 4, 2, dims[0], dtype=torch.bfloat16)
        v = torch.zeros(1, 4, 2, dims[1], dtype=torch.bfloat16)
        served = not backend.call_reasons(CallSpec.of(q, q, v, "none", 0.0, False, None))
        assert served == _fa4_serves((major, 0), dims), (major, dims)


@pytest.mark.parametrize(
    ("release", "capability", "dims", "grad", "reason"),
    [
        ("4.0.0b40", (8, 0), (64, 64), False, None),
        ("4.0.0b40", (8, 6), (64, 64), True, "has its backward on compute capability 9.x-12.x only, found 8.6"),
        ("4.0.0b40", (12, 0), (128, 128), True, None),
        ("4.0.0b40", (12, 0), (264, 264), False, "takes (head_dim, head_dim_v) 8-256, divisible by 8"),
        (
            "4.0.0b10",
            (10, 0),
            (256, 256),
            False,
            "takes (head_dim, head_dim_v) 8-128, (192, 128), (64, 512), divisible by 8",
        ),
        ("4.0.0b11", (10, 0), (256, 256), False, None),
        ("4.0.0b15", (10, 0), (512, 512), False, "8-128, (192, 128), (64, 512), (256, 256), divisible"),
        ("4.0.0b16", (10, 0), (512, 512), False, None),
        ("4.0.0", (10, 0), (512, 512), False, None),
        (None, (8, 0), (64, 64), False, "FlashAttention-4 of unknown release runs on compute capability 9.x-11.x"),
        (None, (12, 0), (64, 64), False, "FlashAttention-4 of unknown release runs on compute capability 9.x-11.x"),
        (None, (10, 0), (192, 128), False, "takes (head_dim, head_dim_v) 8-128, divisible by 8"),
        (None, (9, 0), (256, 256), True, None),
    ],
)
def test_flash4_rules_per_release(
    release: str | None,
    capability: tuple[int, int],
    dims: tuple[int, int],
    grad: bool,
    reason: str | None,
    fake_libraries: Any,
    pretend: Any,
    strict: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """forward 8.x-12.x from 4.0.0b5, backward 9.x-12.x; sm100 shapes by release; unknown builds: every release's."""
    monkeypatch.setattr(flash, "flash4_release", lambda: release)
    pretend("cuda", capability)
    q, _, _ = qkv(dtype=torch.bfloat16, head_dim=dims[0])
    _, k, v = qkv(dtype=torch.bfloat16, head_dim=dims[1])
    k = torch.randn_like(q)
    if grad:
        q.requires_grad_()
    if reason is not None:
        with pytest.raises(UnsupportedCall, match=re.escape(reason)):
            dispatch.dispatch_attention(q, k, v, backend="flash_4")
        assert not fake_flash_attn_cute.calls
        return
    out = dispatch.dispatch_attention(q, k, v, backend="flash_4")
    assert_matches(out, expected(q, k, v))
    if grad:
        out.float().sum().backward()
        assert q.grad is not None


def test_flash4_backward_on_sm80_would_fail_in_the_library(fake_libraries: Any, pretend: Any) -> None:
    """The trap the backward rule avoids: FA4's forward runs on 8.x, its backward asserts 9.x-12.x."""
    pretend("cuda", (8, 0))
    q, k, v = (t.requires_grad_() for t in qkv(dtype=torch.bfloat16))
    out, _ = fake_flash_attn_cute.flash_attn_func(q, k, v)
    with pytest.raises(AssertionError, match=re.escape("Supported: 9.x, 10.x, 11.x, 12.x")):
        out.float().sum().backward()
