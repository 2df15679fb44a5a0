"""Contract tests of torch_xla: the scale diffusers drops, versions, the key blocks of the Pallas kernel (fakes of the
library; see kernel_setup.py and tests/fakes/fake_torch_xla.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from fakes import (
    fake_torch_xla,
)
from kernel_setup import assert_matches, expected, forget, qkv

from attnpatch.core import dispatch, registry
from attnpatch.errors import UnsupportedCall


@pytest.mark.parametrize("scale", [None, 0.3])
def test_xla_honours_scale(scale: float | None, fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("xla")
    q, k, v = qkv(dtype=torch.float32, heads_kv=2, seq_q=8, seq_kv=12)
    out = dispatch.dispatch_attention(q, k, v, scale=scale, is_causal=True, backend="_native_xla")
    assert_matches(out, expected(q, k, v, scale=scale, is_causal=True))
    (call,) = fake_torch_xla.calls
    assert call["sm_scale"] == (scale if scale is not None else 64**-0.5)
    assert call["q"][0] == (2, 4, 8, 64) and call["k"][0] == (2, 4, 12, 64), "(B, H, S, D), key heads repeated"


@pytest.mark.parametrize("version", ["2.2.0", "2.3.0"])
def test_xla_before_2_4_is_refused(
    version: str, fake_libraries: Any, pretend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2.2 has no custom_kernel.py, 2.3's flash_attention has no scale and no backward: 2.4 is the minimum."""
    monkeypatch.setattr(fake_torch_xla, "__version__", version)
    pretend("xla")
    assert registry.get_backend("_native_xla").reasons[0].startswith(f"torch_xla version {version} < 2.4: ")


def test_xla_pads_keys_without_a_mask_the_trap_is_real(fake_libraries: Any) -> None:
    """torch_xla 2.7-2.9 pad k/v with zeros to a multiple of 512 and mask only an ``ab`` bias: the fake does too."""
    q, k, v = (t.transpose(1, 2) for t in qkv(batch=1, seq_q=8, seq_kv=600, heads=2, dtype=torch.float32))
    padded = fake_torch_xla.flash_attention(q, k, v, sm_scale=0.125)
    reference = expected(*(t.transpose(1, 2) for t in (q, k, v)), scale=0.125).transpose(1, 2)
    assert not torch.allclose(padded, reference, atol=1e-3), "the zero keys dilute the softmax"
    bias = torch.zeros(1, 2, 8, 600)
    torch.testing.assert_close(fake_torch_xla.flash_attention(q, k, v, sm_scale=0.125, ab=bias), reference)


@pytest.mark.parametrize(
    ("version", "causal", "seq_q", "grad", "reason"),
    [
        ("2.9.0", False, 8, False, "pads keys and values with zeros to a multiple of 512 without masking them"),
        ("2.9.0", True, 700, False, "pads keys and values with zeros"),  # rows past seq_kv reach the zero keys
        ("2.7.0", False, 8, False, "pads keys and values with zeros"),
        ("2.9.0", True, 8, True, "backward gets the unpadded keys and raises ValueError"),
        ("2.6.0", True, 8, False, "Pallas kernel raises ValueError (kv_seq_len should be divisible by"),
        ("2.4.0", False, 8, False, "Pallas kernel raises ValueError"),
    ],
)
def test_xla_key_length_not_a_multiple_of_512(
    version: str,
    causal: bool,
    seq_q: int,
    grad: bool,
    reason: str,
    fake_libraries: Any,
    pretend: Any,
    strict: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fake_torch_xla, "__version__", version)
    pretend("xla")
    q, k, v = qkv(batch=1, seq_q=seq_q, seq_kv=600, heads=2, dtype=torch.float32)
    if grad:
        q.requires_grad_()
    with pytest.raises(UnsupportedCall, match=re.escape(reason)):
        dispatch.dispatch_attention(q, k, v, is_causal=causal, backend="_native_xla")
    assert not fake_torch_xla.calls


@pytest.mark.parametrize("seq_kv", [600, 1024, 300])
def test_xla_serves_what_it_computes_right(
    seq_kv: int, fake_libraries: Any, pretend: Any, strict: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Causal with seq_q <= seq_kv never reaches the padded keys; 1024 keys need no padding, 300 fit one block."""
    pretend("xla")
    q, k, v = qkv(batch=1, seq_q=8, seq_kv=seq_kv, heads=2, dtype=torch.float32)
    causal = seq_kv == 600
    out = dispatch.dispatch_attention(q, k, v, is_causal=causal, backend="_native_xla")
    assert_matches(out, expected(q, k, v, is_causal=causal))
    monkeypatch.setattr(fake_torch_xla, "__version__", "2.5.0")
    forget()
    if seq_kv != 600:
        assert_matches(dispatch.dispatch_attention(q, k, v, backend="_native_xla"), expected(q, k, v))


def test_xla_backward_runs_where_the_kernel_has_one(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("xla")
    q, k, v = (t.requires_grad_() for t in qkv(batch=1, seq_q=8, seq_kv=1024, heads=2, dtype=torch.float32))
    dispatch.dispatch_attention(q, k, v, backend="_native_xla").sum().backward()
    assert q.grad is not None and k.grad is not None


@pytest.mark.parametrize(("head_dim", "served"), [(64, True), (128, True), (160, False), (256, True)])
def test_xla_head_dim_above_128_must_be_a_multiple_of_128(
    head_dim: int, served: bool, fake_libraries: Any, pretend: Any, strict: None
) -> None:
    pretend("xla")
    q, k, v = qkv(batch=1, seq_q=8, seq_kv=1024, heads=1, head_dim=head_dim, dtype=torch.float32)
    if served:
        assert_matches(dispatch.dispatch_attention(q, k, v, backend="_native_xla"), expected(q, k, v))
        return
    with pytest.raises(UnsupportedCall, match="head_dim 160 > 128 is not a multiple of 128"):
        dispatch.dispatch_attention(q, k, v, backend="_native_xla")
    with pytest.raises(NotImplementedError, match="should be a multiple of 128 if larger"):
        fake_torch_xla.flash_attention(*(t.transpose(1, 2) for t in (q, k, v)))


def test_xla_value_head_dim_must_match(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("xla")
    q, k, _ = qkv(dtype=torch.float32)
    v = torch.randn(2, 12, 4, 32)
    with pytest.raises(UnsupportedCall, match="value head_dim 32 != query head_dim 64"):
        dispatch.dispatch_attention(q, k, v, backend="_native_xla")
