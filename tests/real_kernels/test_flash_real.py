"""The real flash-attn 2.8.3 behind attnpatch's ``flash`` and ``flash_varlen`` backends, run on a CPU.

flash-attn's ROCm Triton backend ships a PyTorch reference implementation of its kernels
(flash_attn/flash_attn_triton_amd/fwd_ref.py and bwd_ref.py, v2.8.3), selected by
``FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE`` and ``FLASH_ATTENTION_TRITON_AMD_REF=1``. Everything above it is the
code a CUDA build runs: flash_attn_interface.py (argument checks, head dims padded to a multiple of 8, the varlen
path, the autograd functions). The one obstacle is that its four ``flash_attn::*`` custom ops are registered for
"cuda" only; ``_cpu_kernels`` registers each op's own Python body for "cpu" as well. Nothing of flash-attn is
replaced or reimplemented here.

Install on a CPU machine (torch stays as it is; ~35 s, no compiler needed):
    pip install wheel packaging psutil einops && pip install triton==3.4.0 --no-deps
    FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE \\
        pip install flash-attn==2.8.3 --no-deps --no-build-isolation
(FORCE_BUILD stops setup.py from looking for a prebuilt CUDA wheel, which fails on a CPU torch with
"InvalidVersion: None".) The reference path costs ~0.3 s a call here.
"""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():  # pragma: no cover - a GPU machine runs the CUDA build in tests/test_gpu.py
    pytest.skip("a CUDA device is present: flash-attn runs for real in tests/test_gpu.py", allow_module_level=True)

# Read when flash_attn.flash_attn_interface is imported, so set before the import below.
os.environ.setdefault("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")
os.environ.setdefault("FLASH_ATTENTION_TRITON_AMD_REF", "1")

flash_attn_interface = pytest.importorskip(
    "flash_attn.flash_attn_interface",
    reason="flash-attn 2.8.3 with its Triton/reference path is not installed (install commands: module docstring)",
)

from reference import reference_attention  # noqa: E402

import attnpatch  # noqa: E402
from attnpatch.testing import emulate_device  # noqa: E402

CUSTOM_OPS = (
    "_flash_attn_forward",
    "_flash_attn_varlen_forward",
    "_flash_attn_backward",
    "_flash_attn_varlen_backward",
)


@pytest.fixture(scope="module", autouse=True)
def _cpu_kernels() -> None:
    # Each flash_attn::* op is a torch.library.custom_op declared with device_types="cuda"; its body calls
    # flash_attn_gpu (here the Triton-AMD interface, which takes the reference path). Registering the same body
    # for "cpu" is what lets CPU tensors reach it. _init_fn is that body (torch/_library/custom_ops.py).
    from flash_attn.flash_attn_triton_amd import utils

    if not (getattr(flash_attn_interface, "USE_TRITON_ROCM", False) and utils.USE_REF):
        pytest.skip("flash_attn was imported before FLASH_ATTENTION_TRITON_AMD_ENABLE/_REF were set")
    for name in CUSTOM_OPS:
        op = getattr(flash_attn_interface, name)
        op.register_kernel("cpu")(op._init_fn)


@pytest.fixture
def strict():
    attnpatch.set_strict(True)
    yield
    attnpatch.set_strict(False)


def _qkv(batch: int, seq_q: int, seq_kv: int, heads: int, heads_kv: int, head_dim: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, seq_q, heads, head_dim, generator=generator).to(dtype)
    key = torch.randn(batch, seq_kv, heads_kv, head_dim, generator=generator).to(dtype)
    value = torch.randn(batch, seq_kv, heads_kv, head_dim, generator=generator).to(dtype)
    return query, key, value


def _assert_matches(backend: str, out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = attnpatch.get_backend(backend).caps.tolerance_for(dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


def _left_padded(batch: int, seq_kv: int, padding: list[int]) -> torch.Tensor:
    """(batch, 1, 1, seq_kv) bool key-padding mask, True = attend, with padding[i] masked keys on the left."""
    keep = torch.ones(batch, seq_kv, dtype=torch.bool)
    for row, count in enumerate(padding):
        keep[row, :count] = False
    return keep[:, None, None, :]


@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads_kv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_flash_matches_float64(strict, head_dim: int, causal: bool, heads_kv: int, dtype: torch.dtype) -> None:
    query, key, value = _qkv(2, 77, 77, 4, heads_kv, head_dim, dtype)
    with emulate_device("cuda", capability=(8, 0)):
        out = attnpatch.dispatch_attention(query, key, value, is_causal=causal, backend="flash")
    _assert_matches("flash", out, reference_attention(query, key, value, is_causal=causal), dtype)


@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("heads_kv", [4, 2], ids=["mha", "gqa"])
def test_flash_varlen_left_padding_matches_float64(strict, head_dim: int, heads_kv: int) -> None:
    query, key, value = _qkv(3, 77, 77, 4, heads_kv, head_dim, torch.float16)
    mask = _left_padded(3, 77, [20, 0, 70])
    with emulate_device("cuda", capability=(8, 0)):
        out = attnpatch.dispatch_attention(query, key, value, attn_mask=mask, backend="flash_varlen")
    _assert_matches("flash_varlen", out, reference_attention(query, key, value, attn_mask=mask), torch.float16)


def test_flash_varlen_entry_with_no_key_is_zero(strict) -> None:
    # flash-attn's CUDA kernel exits early for an empty key sequence and writes 0 (csrc/flash_attn/src/
    # flash_fwd_kernel.h, "n_block_max <= n_block_min"); its reference path (fwd_ref.py,
    # attention_forward_core_ref_impl) raises "IndexError: max(): Expected reduction dim 2 to have non-zero size"
    # instead. attnpatch must not depend on either: the entry must come out as exact zeros, no error, no NaN.
    query, key, value = _qkv(3, 77, 77, 4, 2, 64, torch.float16)
    mask = _left_padded(3, 77, [20, 77, 0])
    with emulate_device("cuda", capability=(8, 0)):
        out = attnpatch.dispatch_attention(query, key, value, attn_mask=mask, backend="flash_varlen")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    _assert_matches("flash_varlen", out, reference_attention(query, key, value, attn_mask=mask), torch.float16)


def test_flash_backward_matches_float64(strict) -> None:
    query, key, value = (t.requires_grad_() for t in _qkv(2, 77, 77, 4, 2, 64, torch.float16))
    with emulate_device("cuda", capability=(8, 0)):
        out = attnpatch.dispatch_attention(query, key, value, is_causal=True, backend="flash")
    grads = torch.autograd.grad(out.float().square().sum(), (query, key, value))
    inputs = [t.detach().double().requires_grad_() for t in (query, key, value)]
    expected = torch.autograd.grad(reference_attention(*inputs, is_causal=True).square().sum(), inputs)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.double(), want, atol=5e-2, rtol=2e-2)


def test_flash_refuses_causal_with_more_keys_than_queries(strict) -> None:
    # flash-attn aligns causal bottom-right when seq_q != seq_kv (its README); the dispatcher's is_causal is
    # top-left like SDPA, so the call must be refused, not answered differently.
    query, key, value = _qkv(1, 5, 77, 4, 2, 64, torch.float16)
    with emulate_device("cuda", capability=(8, 0)), pytest.raises(attnpatch.UnsupportedCall):
        attnpatch.dispatch_attention(query, key, value, is_causal=True, backend="flash")


def test_flash_bottom_right_causal_is_what_the_library_does() -> None:
    # The fact the refusal above rests on, checked on the library itself: 5 queries over 77 keys, causal, equals
    # the reference with the last query aligned to the last key.
    query, key, value = _qkv(1, 5, 77, 2, 2, 64, torch.float16)
    out = flash_attn_interface.flash_attn_func(query, key, value, causal=True)
    keep = torch.ones(5, 77, dtype=torch.bool).tril(77 - 5)
    expected = reference_attention(query, key, value, attn_mask=keep[None, None])
    torch.testing.assert_close(out.double(), expected, atol=4e-3, rtol=4e-3)


def test_flash_refuses_before_sm80(strict) -> None:
    query, key, value = _qkv(1, 16, 16, 2, 2, 64, torch.float16)
    with emulate_device("cuda", capability=(7, 5)), pytest.raises(attnpatch.UnsupportedCall, match=r"8\.0"):
        attnpatch.dispatch_attention(query, key, value, backend="flash")


# ----- the later arguments (issue #12): lse and sinks on the real interface; what its ROCm path ignores ----------


def _reference_lse(query, key, value, keep=None, scale=None):
    # float64 log-sum-exp (batch, seq_q, heads) of the scaled logits, -inf on rows with no key
    q, k = query.double().transpose(1, 2), key.double().transpose(1, 2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(logits, dim=-1).transpose(1, 2)


@pytest.mark.parametrize("heads_kv", [4, 2], ids=["mha", "gqa"])
def test_flash_lse_and_sinks_match_float64(strict, heads_kv: int) -> None:
    # The lse comes from flash_attn_func(..., return_attn_probs=True): softmax_lse (batch, heads, seq_q), natural log
    # (fwd_ref.py converts its base-2 sums with LN2); attnpatch returns it (batch, seq_q, heads) float32.
    query, key, value = _qkv(2, 77, 77, 4, heads_kv, 64, torch.float16)
    sinks = torch.linspace(-1.0, 2.0, 4)
    with emulate_device("cuda", capability=(8, 0)):
        out, lse = attnpatch.dispatch_attention(query, key, value, scale=0.1, backend="flash", return_lse=True)
        sunk = attnpatch.dispatch_attention(query, key, value, scale=0.1, backend="flash", sinks=sinks)
    want_lse = _reference_lse(query, key, value, scale=0.1)
    assert lse.shape == (2, 77, 4) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-3, rtol=2e-3)
    expected = reference_attention(query, key, value, scale=0.1)
    _assert_matches("flash", out, expected, torch.float16)
    _assert_matches("flash", sunk, expected * torch.sigmoid(want_lse - sinks.double()).unsqueeze(-1), torch.float16)


def test_flash_varlen_lse_left_padding_matches_float64(strict) -> None:
    query, key, value = _qkv(3, 77, 77, 4, 2, 64, torch.float16)
    mask = _left_padded(3, 77, [20, 77, 0])  # entry 1 has no key: out 0, lse -inf
    with emulate_device("cuda", capability=(8, 0)):
        out, lse = attnpatch.dispatch_attention(
            query, key, value, attn_mask=mask, backend="flash_varlen", return_lse=True
        )
    want = _reference_lse(query, key, value, keep=mask)
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[[0, 2]]).all()
    torch.testing.assert_close(lse[[0, 2]].double(), want[[0, 2]], atol=2e-3, rtol=2e-3)
    _assert_matches("flash_varlen", out, reference_attention(query, key, value, attn_mask=mask), torch.float16)


def test_flash_rocm_triton_path_ignores_softcap_and_window() -> None:
    # flash-attn 2.8.3's ROCm Triton backend (flash_attn_triton_amd/interface_fa.py fwd) builds its metadata without
    # softcap or window_size: both change nothing. This is why attnpatch refuses them on AMD GPUs.
    query, key, value = _qkv(1, 33, 33, 2, 2, 64, torch.float16)
    plain = flash_attn_interface.flash_attn_func(query, key, value)
    capped = flash_attn_interface.flash_attn_func(query, key, value, softcap=0.5, window_size=(2, 2))
    assert torch.equal(plain, capped)
    with emulate_device("cuda", capability=(9, 4), rocm=True), pytest.raises(attnpatch.UnsupportedCall, match="AMD"):
        attnpatch.set_strict(True)
        try:
            attnpatch.dispatch_attention(query, key, value, backend="flash", softcap=0.5)
        finally:
            attnpatch.set_strict(False)
