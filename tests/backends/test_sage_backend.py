"""Contract tests of SageAttention: what it swallows, kernels per architecture, 1.x (fakes of the library; see
kernel_setup.py)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from fakes import (
    fake_sageattention,
    fake_sageattention_v1,
)
from kernel_setup import SAGE, assert_matches, expected, forget, padding_mask, qkv, setup_backend

from attnpatch.core import dispatch, registry, selection
from attnpatch.core.call import CallSpec
from attnpatch.errors import AttnpatchWarning, UnsupportedCall


def test_sage_mask_falls_back_to_the_right_answer(fake_libraries: Any, pretend: Any) -> None:
    pretend("cuda", (9, 0))
    q, k, v = qkv()
    keep = padding_mask([12, 4], 12)
    with pytest.warns(AttnpatchWarning, match="'sage' cannot serve this call .*does not take a key-padding"):
        out = dispatch.dispatch_attention(q, k, v, attn_mask=keep, backend="sage")
    assert_matches(out, expected(q, k, v, attn_mask=keep))
    assert not fake_sageattention.calls


def test_sage_passes_nothing_it_would_swallow(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("cuda", (8, 9))
    q, k, v = qkv(heads_kv=2)
    dispatch.dispatch_attention(q, k, v, scale=0.2, backend="sage", enable_gqa=True)
    (call,) = fake_sageattention.calls
    assert call["kwargs"] == {} and call["tensor_layout"] == "NHD" and call["sm_scale"] == 0.2


def test_sage_cuda_kernels_use_per_warp_on_sm120(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("cuda", (12, 0))
    q, k, v = qkv()
    dispatch.dispatch_attention(q, k, v, backend="_sage_qk_int8_pv_fp8_cuda")
    assert fake_sageattention.calls[-1]["kwargs"] == {"qk_quant_gran": "per_warp"}


def test_sage_kernel_not_built_is_a_reason(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("cuda", (9, 0))
    fake_sageattention.core.SM89_ENABLED = False
    q, k, v = qkv()
    with pytest.raises(UnsupportedCall, match=r"built without the kernel .* \(SM89_ENABLED is False\)"):
        dispatch.dispatch_attention(q, k, v, backend="_sage_qk_int8_pv_fp8_cuda")


def test_sage_1x_gets_a_copy_of_the_key(
    fake_libraries: Any, pretend: Any, strict: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sageattention", fake_sageattention_v1)
    pretend("cuda", (8, 9))
    # 64 keys: 1.x masks no partial last key block (see test_sage_1x_tail_block_is_refused), a full one is right.
    q, k, v = qkv(heads_kv=2, seq_kv=64)
    before = k.clone()
    out = dispatch.dispatch_attention(q, k, v, backend="sage")
    assert_matches(out, expected(q, k, v))
    assert torch.equal(k, before), "sageattention 1.x subtracts the key mean in place: it must get a copy"
    out = dispatch.dispatch_attention(q, k, v, backend="sage_varlen")  # no mask: packing is a view of the key
    assert_matches(out, expected(q, k, v))
    assert torch.equal(k, before)


@pytest.mark.parametrize("backend", ["sage", "sage_varlen"])
def test_sage_1x_tail_block_is_refused(
    backend: str, fake_libraries: Any, pretend: Any, strict: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1.0.6 returns outputs 25-37% too small for non-causal calls with seq_kv % 64 != 0 (CLIP's 77 tokens): refused
    # with the version and the fix, while causal calls and full blocks are served (and right).
    monkeypatch.setitem(sys.modules, "sageattention", fake_sageattention_v1)
    pretend("cuda", (8, 9))
    q, k, v = qkv(heads_kv=2, seq_q=64, seq_kv=77)
    with pytest.raises(UnsupportedCall, match=r"sageattention 1\.0\.6's Triton kernels do not mask the last block"):
        dispatch.dispatch_attention(q, k, v, backend=backend)
    assert "sageattention >= 2.2.0" in str(
        registry.get_backend(backend).call_reasons(CallSpec.of(q, k, v, "none", 0.0, False, None))
    )
    q, k, v = qkv(heads_kv=2, seq_q=77, seq_kv=77)
    assert_matches(
        dispatch.dispatch_attention(q, k, v, is_causal=True, backend=backend), expected(q, k, v, is_causal=True)
    )
    with pytest.raises(UnsupportedCall, match="lengths are not known before the call"):
        dispatch.dispatch_attention(q, k, v, attn_mask=padding_mask([77, 40], 77), backend="sage_varlen")
    selection.set_strict(False)
    with pytest.warns(AttnpatchWarning, match="do not mask the last block"):
        out = dispatch.dispatch_attention(q, k, v, backend=backend)
    assert_matches(out, expected(q, k, v))  # fell back to native: right


def test_sage_1x_head_dims(fake_libraries: Any, pretend: Any, strict: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sageattention", fake_sageattention_v1)
    pretend("cuda", (8, 9))
    q, k, v = qkv(head_dim=80)
    with pytest.raises(UnsupportedCall, match=r"sageattention 1\.x sageattn takes head_dim 64, 96, 128, got 80"):
        dispatch.dispatch_attention(q, k, v, backend="sage")
    monkeypatch.setitem(sys.modules, "sageattention", fake_sageattention)
    forget()
    assert_matches(dispatch.dispatch_attention(q, k, v, backend="sage"), expected(q, k, v))


@pytest.mark.parametrize("name", SAGE)
def test_sage_has_no_backward(name: str, fake_libraries: Any, pretend: Any, strict: None, trusted: None) -> None:
    dtype, head_dim, _, _ = setup_backend(name, pretend)
    q, k, v = qkv(dtype=dtype, head_dim=head_dim)
    with pytest.raises(UnsupportedCall, match="has no backward pass"):
        dispatch.dispatch_attention(q.requires_grad_(), k, v, backend=name)


@pytest.mark.parametrize("marked", [False, True], ids=["main-before-the-fix", "v2.2.0"])
def test_a_build_that_says_2_2_0_without_the_fix_is_refused(
    marked: bool, fake_libraries: Any, pretend: Any, strict: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # Builds of upstream main from 0d30f5c to 628a89f say 2.2.0 but lack commit 3917283's masking (their Triton
    # kernels give 2.1.1's wrong answers, docs/kernel-truth.md): the kernel source tells them apart.
    import importlib.machinery

    package = tmp_path / "sageattention"
    (package / "triton").mkdir(parents=True)
    for name in ("attn_qk_int8_per_block.py", "attn_qk_int8_block_varlen.py"):
        line = "qk += tl.where(k_mask, 0, -1.0e6)" if marked else "qk = tl.dot(q, k)"
        (package / "triton" / name).write_text(f"def kernel():\n    {line}\n")
    spec = importlib.machinery.ModuleSpec("sageattention", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    monkeypatch.setattr(fake_sageattention, "__spec__", spec)
    pretend("cuda", (8, 0))
    q, k, v = qkv(heads_kv=2, seq_q=64, seq_kv=77)
    if marked:
        assert_matches(dispatch.dispatch_attention(q, k, v, backend="sage_varlen"), expected(q, k, v))
    else:
        with pytest.raises(UnsupportedCall, match=r"2\.2\.0 \(a build from before upstream commit 3917283\)"):
            dispatch.dispatch_attention(q, k, v, backend="sage_varlen")
