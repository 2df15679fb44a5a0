"""softcap, window, sinks and return_lse on the FlashAttention backends (2, 3, 4; dense and varlen), against the
float64 reference of tests/core/test_extra_args.py, through the fakes (kernel_setup.py), which apply softcap and
the window bottom-right aligned and return the lse in each library's layout (flash-attn 2 (batch, heads, seq_q) and
(heads, total_q) for varlen, +inf on a row with no key, as its CUDA kernel writes). Tolerances: the backend's own
for the output (fp16 4e-3), 2e-3 for the lse (float32 from float64 logits of fp16 inputs).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fakes import fake_flash_attn, fake_flash_attn_cute, fake_flash_attn_interface
from kernel_setup import qkv

from attnpatch.core import dispatch, registry
from attnpatch.core.call import MASK_NONE, CallSpec
from attnpatch.errors import UnsupportedCall
from tests.core.test_extra_args import reference

# backend -> (compute capability, fake module)
DENSE = {"flash": ((8, 0), fake_flash_attn), "_flash_3": ((9, 0), fake_flash_attn_interface)}
DENSE["flash_4"] = ((10, 0), fake_flash_attn_cute)
VARLEN = {"flash_varlen": ((8, 0), fake_flash_attn), "_flash_varlen_3": ((9, 0), fake_flash_attn_interface)}


def _check(backend: str, out: torch.Tensor, lse: torch.Tensor | None, want: tuple[torch.Tensor, torch.Tensor]):
    atol, rtol = registry.get_backend(backend).caps.tolerance_for(out.dtype)
    torch.testing.assert_close(out.double(), want[0], atol=atol, rtol=rtol)
    if lse is not None:
        assert lse.shape == want[1].shape and lse.dtype == torch.float32
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want[1])), "rows with no key: lse -inf, only there"
        finite = torch.isfinite(want[1])
        torch.testing.assert_close(lse.double()[finite], want[1][finite], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", list(DENSE))
@pytest.mark.parametrize(
    "extra",
    [
        {"softcap": 1.5},
        {"window": (5, 3)},
        {"window": (6, -1), "is_causal": True},
        {"return_lse": True},
        {"softcap": 2.0, "window": (4, 0), "sinks": True, "return_lse": True},
    ],
    ids=["softcap", "window", "window_causal", "lse", "all"],
)
def test_dense_matches_float64(fake_libraries: Any, pretend: Any, strict: None, backend: str, extra: dict) -> None:
    capability, fake = DENSE[backend]
    pretend("cuda", capability)
    q, k, v = qkv(seq_q=77, heads=8, heads_kv=2, seed=3)
    q, k = q * 2, k * 2  # logits large enough to be capped
    given = dict(extra)
    causal = given.pop("is_causal", False)
    if given.get("sinks"):
        given["sinks"] = torch.randn(8, generator=torch.Generator().manual_seed(1))
    result = dispatch.dispatch_attention(q, k, v, is_causal=causal, backend=backend, **given)
    out, lse = result if given.get("return_lse") else (result, None)
    want = reference(q, k, v, None, causal, None, given.get("softcap"), given.get("window"), given.get("sinks"))
    _check(backend, out, lse, want)
    call = fake.calls[-1]
    assert call["softcap"] == given.get("softcap", call["softcap"]) and "window_size" in call


def test_flash_argument_mapping_of_the_later_arguments(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("cuda", (8, 0))
    q, k, v = qkv(seq_q=16)
    dispatch.dispatch_attention(q, k, v, backend="flash", softcap=30.0, window=(4, 2))
    assert fake_flash_attn.calls[-1]["softcap"] == 30.0 and fake_flash_attn.calls[-1]["window_size"] == (4, 2)
    dispatch.dispatch_attention(q, k, v, backend="flash", window=(4, 7), is_causal=True)  # causal: the window (4, 0)
    assert fake_flash_attn.calls[-1]["window_size"] == (4, 0) and fake_flash_attn.calls[-1]["causal"] is False
    dispatch.dispatch_attention(q, k, v, backend="flash")  # a plain call passes what it always passed
    assert fake_flash_attn.calls[-1]["window_size"] == (-1, -1) and fake_flash_attn.calls[-1]["softcap"] == 0.0
    pretend("cuda", (10, 0))
    dispatch.dispatch_attention(q, k, v, backend="flash_4", window=(3, -1), return_lse=True)
    assert fake_flash_attn_cute.calls[-1]["window_size"] == (3, None), "FA4: None is unbounded"
    assert fake_flash_attn_cute.calls[-1]["return_lse"] is True


@pytest.mark.parametrize("backend", list(VARLEN))
def test_varlen_left_padding_matches_float64(fake_libraries: Any, pretend: Any, strict: None, backend: str) -> None:
    capability, _ = VARLEN[backend]
    pretend("cuda", capability)
    q, k, v = qkv(batch=3, seq_q=9, seq_kv=77, heads=4, heads_kv=2, seed=5)
    mask = torch.ones(3, 77, dtype=torch.bool)
    mask[0, :30] = False
    mask[2, :] = False  # an entry with no key: out 0, lse -inf
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(2))
    out, lse = dispatch.dispatch_attention(q, k, v, mask, backend=backend, softcap=2.5, sinks=sinks, return_lse=True)
    _check(backend, out, lse, reference(q, k, v, mask, softcap=2.5, sinks=sinks))
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isneginf(lse[2]).all()


def _reasons(backend: str, q: torch.Tensor, k: torch.Tensor, **flags: Any) -> list[str]:
    return registry.get_backend(backend).call_reasons(CallSpec.of(q, k, k, MASK_NONE, 0.0, False, None, **flags))


def test_refusals_name_the_argument(fake_libraries: Any, pretend: Any) -> None:
    pretend("cuda", (8, 0))
    q, k, _ = qkv(seq_q=9, seq_kv=77)
    assert any("aligns windows bottom-right" in r for r in _reasons("flash", q, k, window=(2, 2)))
    assert any("no sliding window (window=...)" in r for r in _reasons("flash_varlen", q, q, window=(2, 2)))
    sinks = torch.zeros(4, requires_grad=True)
    assert any("sinks" in r and "gradient" in r for r in _reasons("flash", q, q, sinks=sinks))
    grad_q = q.detach().requires_grad_()
    assert any("return_lse" in r for r in _reasons("flash", grad_q, grad_q, return_lse=True))
    pretend("cuda", (9, 4), rocm=True)
    assert any("AMD" in r for r in _reasons("flash", q, q, softcap=1.0))


def test_window_cross_falls_back_to_native(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("cuda", (8, 0))
    q, k, v = qkv(seq_q=9, seq_kv=77)
    with pytest.raises(UnsupportedCall, match="aligns windows bottom-right"):
        dispatch.dispatch_attention(q, k, v, backend="flash", window=(3, 1))
    assert fake_flash_attn.calls == []


def test_compiled_calls_with_later_arguments_are_refused(fake_libraries: Any, pretend: Any) -> None:
    pretend("cuda", (8, 0))
    q, k, _ = qkv()
    call = CallSpec.of(q, k, k, MASK_NONE, 0.0, False, None, softcap=1.0)
    compiled = CallSpec(**{**call.__dict__, "compiling": True})
    assert any("torch.compile" in r for r in registry.get_backend("flash").call_reasons(compiled))
    assert not any("torch.compile" in r for r in registry.get_backend("flash").call_reasons(call))


def test_hub_twins_share_the_declarations() -> None:
    for pip, hub in (("flash", "flash_hub"), ("flash_varlen", "flash_varlen_hub"), ("_flash_3", "_flash_3_hub")):
        a, b = registry.get_backend(pip).caps, registry.get_backend(hub).caps
        assert (a.softcap, a.window, a.sinks, a.return_lse) == (b.softcap, b.window, b.sinks, b.return_lse)
    assert registry.get_backend("flash_varlen").caps.window is False
