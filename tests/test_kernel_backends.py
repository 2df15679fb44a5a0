"""Contract tests of the kernel-library backends (flash, sage, xformers, aiter, hub, xla, npu) on a CPU machine.

The real libraries need a GPU, TPU or NPU. tests/fakes holds a fake of each that implements the library's
documented signature with reference math and records every call; the ``fakes`` fixture installs them into
sys.modules under the real names. The tests prove argument mapping, layouts, causal alignment, varlen packing,
mask-to-bias conversion, GQA, reasons and fallback. tests/test_gpu.py runs the real libraries where present.

How a CPU test reaches a GPU-only adapter, and why that is honest: every backend here declares its devices (and
compute capability), checked per call from the tensors, and its ``requires`` asks whether a GPU exists. The
``pretend`` fixture uses ``attnpatch.testing.emulate_device``, which changes exactly those three facts: CPU
tensors count as being on device 0 of the pretended kind, with the pretended compute capability, and the GPU
(an AMD one with ``rocm=True``) counts as present. Everything else (dtype, head dim, masks,
causal alignment, GQA, dropout, versions, imports) is checked for real and the adapter runs for real, on CPU
tensors, against the fake. Without ``pretend`` the same calls are refused (test_cpu_tensors_are_refused), and
every test that expects an answer from a backend runs in strict mode, so a refusal cannot hide behind a fallback.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import fakes
import pytest
import torch
import torch.nn.functional as F
from fakes import (
    fake_aiter,
    fake_flash_attn,
    fake_flash_attn_interface,
    fake_kernels,
    fake_sageattention,
    fake_sageattention_v1,
    fake_torch_npu,
    fake_torch_xla,
    fake_xformers,
)

from attnpatch.backends import _probe, hub
from attnpatch.core import capabilities, dispatch, masks, registry, selection
from attnpatch.core.call import CallSpec
from attnpatch.errors import AttnpatchWarning, UnsupportedCall
from attnpatch.testing import emulate_device

# The table: every one of these must be registered, listed, and covered by a contract test below.
TABLE = (
    "flash",
    "flash_varlen",
    "_flash_3",
    "_flash_varlen_3",
    "flash_hub",
    "flash_varlen_hub",
    "_flash_3_hub",
    "_flash_3_varlen_hub",
    "flash_4_hub",
    "aiter_fa2_hub",
    "sage_hub",
    "sage_blackwell_hub",
    "aiter",
    "sage",
    "sage_varlen",
    "_sage_qk_int8_pv_fp8_cuda",
    "_sage_qk_int8_pv_fp8_cuda_sm90",
    "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton",
    "xformers",
    "_native_xla",
    "_native_npu",
)

# name -> (device, compute capability, ROCm, dtype, head_dim, fake module, the function it must call)
SETUP: dict[str, tuple[str, tuple[int, int], bool, torch.dtype, int, Any, str]] = {
    "flash": ("cuda", (8, 0), False, torch.float16, 64, fake_flash_attn, "flash_attn_func"),
    "flash_varlen": ("cuda", (8, 6), False, torch.bfloat16, 64, fake_flash_attn, "flash_attn_varlen_func"),
    "_flash_3": ("cuda", (9, 0), False, torch.bfloat16, 64, fake_flash_attn_interface, "flash_attn_func"),
    "_flash_varlen_3": ("cuda", (9, 0), False, torch.float16, 64, fake_flash_attn_interface, "flash_attn_varlen_func"),
    "flash_hub": ("cuda", (8, 0), False, torch.float16, 64, fake_flash_attn, "flash_attn_func"),
    "flash_varlen_hub": ("cuda", (8, 0), False, torch.float16, 64, fake_flash_attn, "flash_attn_varlen_func"),
    "_flash_3_hub": ("cuda", (9, 0), False, torch.bfloat16, 64, fake_flash_attn_interface, "flash_attn_func"),
    "_flash_3_varlen_hub": (
        "cuda",
        (9, 0),
        False,
        torch.bfloat16,
        64,
        fake_flash_attn_interface,
        "flash_attn_varlen_func",
    ),
    "flash_4_hub": ("cuda", (10, 0), False, torch.bfloat16, 64, fake_kernels, "flash_attn_4"),
    "aiter_fa2_hub": ("cuda", (9, 4), True, torch.bfloat16, 64, fake_aiter, "flash_attn_func"),
    "sage_hub": ("cuda", (9, 0), False, torch.float16, 64, fake_sageattention, "sageattn"),
    "sage_blackwell_hub": ("cuda", (12, 0), False, torch.bfloat16, 64, fake_kernels, "sageattn3_blackwell"),
    "aiter": ("cuda", (9, 4), True, torch.float16, 64, fake_aiter, "flash_attn_func"),
    "sage": ("cuda", (8, 9), False, torch.float16, 64, fake_sageattention, "sageattn"),
    "sage_varlen": ("cuda", (8, 0), False, torch.float16, 64, fake_sageattention, "sageattn_varlen"),
    "_sage_qk_int8_pv_fp8_cuda": (
        "cuda",
        (8, 9),
        False,
        torch.float16,
        64,
        fake_sageattention,
        "sageattn_qk_int8_pv_fp8_cuda",
    ),
    "_sage_qk_int8_pv_fp8_cuda_sm90": (
        "cuda",
        (9, 0),
        False,
        torch.bfloat16,
        64,
        fake_sageattention,
        "sageattn_qk_int8_pv_fp8_cuda_sm90",
    ),
    "_sage_qk_int8_pv_fp16_cuda": (
        "cuda",
        (8, 0),
        False,
        torch.float16,
        64,
        fake_sageattention,
        "sageattn_qk_int8_pv_fp16_cuda",
    ),
    "_sage_qk_int8_pv_fp16_triton": (
        "cuda",
        (8, 6),
        False,
        torch.float16,
        64,
        fake_sageattention,
        "sageattn_qk_int8_pv_fp16_triton",
    ),
    "xformers": ("cuda", (8, 0), False, torch.float16, 64, fake_xformers, "memory_efficient_attention"),
    "_native_xla": ("xla", (0, 0), False, torch.bfloat16, 64, fake_torch_xla, "flash_attention"),
    "_native_npu": ("npu", (0, 0), False, torch.float16, 64, fake_torch_npu, "npu_fusion_attention"),
}

VARLEN = ("flash_varlen", "_flash_varlen_3", "sage_varlen", "flash_varlen_hub", "_flash_3_varlen_hub")
SAGE = tuple(name for name in TABLE if "sage" in name)

# What each backend must refuse among the scenarios of test_scenarios, and the reason it must give. Everything
# not listed here must be served and match the reference.
CAUSAL_BOTTOM_RIGHT = "aligns causal masks bottom-right"
SAGE_CAUSAL = "supports is_causal only when seq_q == seq_kv"
REFUSALS: dict[tuple[str, str], str] = {
    **{
        (name, "causal_cross"): CAUSAL_BOTTOM_RIGHT
        for name in (
            "flash",
            "flash_varlen",
            "_flash_3",
            "_flash_varlen_3",
            "flash_hub",
            "flash_varlen_hub",
            "_flash_3_hub",
            "_flash_3_varlen_hub",
            "flash_4_hub",
            "aiter_fa2_hub",
            "aiter",
        )
    },
    **{(name, "causal_cross"): SAGE_CAUSAL for name in SAGE},
    ("sage_blackwell_hub", "scale"): "ignores a custom softmax scale",
}

ROCM_REASON = "needs a ROCm build of torch (torch.version.hip is None): this kernel runs on AMD GPUs"


def _forget() -> None:
    # Availability is cached per backend, routing decisions per call kind, Hub downloads per revision: forget all
    # of it when the fakes come and go (trust and pins are kept: tests set them after the fakes).
    hub.forget_downloads()
    registry.refresh()
    dispatch.reset_fallbacks()


@pytest.fixture
def fake_libraries(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The fakes installed under the real module names, with fresh call logs."""
    fakes.reset()
    for name, module in fakes.MODULES.items():
        monkeypatch.setitem(sys.modules, name, module)
    _forget()
    yield fakes
    _forget()


@pytest.fixture
def pretend() -> Iterator[Any]:
    """pretend(device, capability, rocm): CPU tensors count as being on that device (attnpatch.testing)."""
    with ExitStack() as stack:

        def apply(device: str = "cuda", capability: tuple[int, int] = (9, 0), rocm: bool = False) -> None:
            stack.close()
            stack.enter_context(emulate_device(device, capability=capability, rocm=rocm))
            _forget()

        yield apply


@pytest.fixture
def strict() -> Iterator[None]:
    selection.set_strict(True)
    yield
    selection.set_strict(False)


@pytest.fixture(autouse=True)
def _hub_state() -> Iterator[None]:
    # Trust and pins are process-wide: every test starts and ends without them.
    yield
    hub.reset()


@pytest.fixture
def trusted() -> None:
    hub.trust_hub_kernels(True)


def setup_backend(name: str, pretend: Any) -> tuple[torch.dtype, int, Any, str]:
    device, capability, rocm, dtype, head_dim, module, function = SETUP[name]
    pretend(device, capability, rocm)
    if name in hub.KERNELS:
        hub.trust_hub_kernels(True)
    return dtype, head_dim, module, function


def qkv(
    batch: int = 2,
    seq_q: int = 12,
    seq_kv: int | None = None,
    heads: int = 4,
    heads_kv: int | None = None,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""
    generator = torch.Generator().manual_seed(seed)
    seq_kv = seq_q if seq_kv is None else seq_kv
    heads_kv = heads if heads_kv is None else heads_kv

    def make(seq: int, h: int) -> torch.Tensor:
        return torch.randn(batch, seq, h, head_dim, generator=generator).to(dtype)

    return make(seq_q, heads), make(seq_kv, heads_kv), make(seq_kv, heads_kv)


def expected(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """torch's SDPA in float64 (independent of the fakes' math), 0 for query rows with no key, in q's dtype."""
    mask = None
    if attn_mask is not None:
        mask, _ = masks.normalize(attn_mask, q, k)
        if is_causal:
            mask, _ = masks.fold_causal(mask, "", q.shape[1], k.shape[1])
            is_causal = False
        if mask.dtype != torch.bool:
            mask = mask.double()
    out = F.scaled_dot_product_attention(
        *(t.double().transpose(1, 2) for t in (q, k, v)),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=True,
    ).transpose(1, 2)
    return masks.zero_fully_masked(out.nan_to_num(0.0), mask).to(q.dtype)


def assert_matches(out: torch.Tensor, reference: torch.Tensor) -> None:
    assert out.shape == reference.shape and out.dtype == reference.dtype
    assert not out.isnan().any(), "NaN in the output"
    atol, rtol = capabilities.DEFAULT_TOLERANCE[out.dtype]
    torch.testing.assert_close(out, reference, atol=atol, rtol=rtol)


def calls_of(module: Any, function: str) -> list[dict[str, Any]]:
    return [call for call in module.calls if call["function"] == function]


# ----- registration and availability on this machine -----------------------------------------------------------


DOCS = (Path(__file__).resolve().parent.parent / "docs" / "backends.md").read_text()


@pytest.mark.parametrize("name", TABLE)
def test_backend_is_registered_covered_and_documented(name: str) -> None:
    backend = registry.get_backend(name)
    assert backend.builtin and backend.description
    assert name in SETUP, "every backend of the table needs a contract setup"
    rows = [line for line in DOCS.splitlines() if line.startswith("| ") and f"`{name}`" in line.split("|")[1]]
    assert rows, f"docs/backends.md does not document {name}"
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    if len(cells) == 11:  # the capability table: lossy and priority must match the declaration
        assert cells[10] == str(backend.caps.priority)
        assert cells[9] in ("", "yes" if backend.caps.lossy else "no")


EXPECTED_REASON = {
    "flash": "flash_attn not installed: pip install flash-attn --no-build-isolation",
    "flash_varlen": "flash_attn not installed: pip install flash-attn --no-build-isolation",
    "_flash_3": "flash_attn_interface not installed: build FlashAttention-3 from",
    "_flash_varlen_3": "flash_attn_interface not installed: build FlashAttention-3 from",
    "aiter": "aiter not installed: pip install amd-aiter",
    "xformers": "xformers not installed: pip install xformers",
    "_native_xla": "torch_xla not installed: pip install torch-xla",
    "_native_npu": "torch_npu not installed: pip install torch-npu",
    **{name: "sageattention not installed: pip install sageattention" for name in SAGE if name not in hub.KERNELS},
    **{name: "kernels not installed: pip install kernels" for name in hub.KERNELS},
}


@pytest.mark.parametrize("name", TABLE)
def test_unavailable_here_with_the_fix(name: str) -> None:
    """On this CPU machine none of the packages is installed; each backend says which one, and how to get it."""
    backend = registry.get_backend(name)
    module = EXPECTED_REASON[name].split(" ", 1)[0]
    if _probe.installed(module):
        pytest.skip(f"{module} is installed here")
    assert not backend.available
    assert backend.reasons[0].startswith(EXPECTED_REASON[name])
    if SETUP[name][0] == "cuda":
        assert any("CUDA GPU" in reason for reason in backend.reasons)


def test_list_command_shows_every_backend() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "attnpatch", "list"], capture_output=True, text=True, timeout=120, check=True
    )
    for name in TABLE:
        assert f"\n{name} " in result.stdout or result.stdout.startswith(f"{name} ")
    assert "flash: flash_attn not installed: pip install flash-attn --no-build-isolation" in result.stdout
    assert "opt in with ATTNPATCH_TRUST_HUB_KERNELS=1" in result.stdout


def test_listing_imports_no_kernel_package() -> None:
    code = (
        "import sys\nfrom attnpatch.core import registry\n[b.reasons for b in registry.list_backends()]\n"
        "print(sorted(m for m in ('flash_attn', 'flash_attn_interface', 'sageattention', 'xformers', 'aiter', "
        "'torch_xla', 'torch_npu', 'kernels', 'triton') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_version_too_old(fake_libraries: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_flash_attn, "__version__", "2.5.0")
    monkeypatch.setattr(fake_xformers, "__version__", "0.0.28.post3")
    monkeypatch.setattr(fake_sageattention, "__version__", "2.1.0")
    monkeypatch.setattr(fake_kernels, "__version__", "0.11.7")
    _forget()
    assert "flash_attn version 2.5.0 < 2.6.3: pip install -U 'flash-attn>=2.6.3' --no-build-isolation" in (
        registry.get_backend("flash").reasons
    )
    assert registry.get_backend("xformers").reasons[0].startswith("xformers version 0.0.28.post3 < 0.0.29")
    assert (
        registry.get_backend("_sage_qk_int8_pv_fp16_cuda").reasons[0].startswith("sageattention version 2.1.0 < 2.1.1")
    )
    assert registry.get_backend("flash_hub").reasons[0].startswith("kernels version 0.11.7 < 0.12")
    # sage itself runs any release that has sageattn, 1.0.x included
    assert not any("version" in reason for reason in registry.get_backend("sage").reasons)


@pytest.mark.parametrize(
    ("name", "capability", "reason"),
    [
        ("flash", (7, 5), "needs compute capability >= 8.0, found 7.5"),
        ("_flash_3", (8, 6), "needs compute capability >= 9.0, found 8.6"),
        ("_flash_3", (10, 0), "runs on compute capability <= 9.0, found 10.0"),
        ("flash_4_hub", (12, 0), "runs on compute capability <= 11.0, found 12.0"),
        ("_sage_qk_int8_pv_fp8_cuda_sm90", (8, 9), "needs compute capability >= 9.0, found 8.9"),
        ("_sage_qk_int8_pv_fp8_cuda", (8, 6), "needs compute capability >= 8.9, found 8.6"),
        ("sage", (8, 7), "runs on compute capability 8.0, 8.6, 8.9, 9.0, 12.0 (the architectures sageattn"),
        ("sage_varlen", (12, 0), "SageAttention's Triton kernels are not usable on compute capability 12.x"),
        ("sage_blackwell_hub", (11, 0), "runs on compute capability 10.0, 12.0"),
        ("xformers", (7, 5), "xformers runs bfloat16 on compute capability >= 8.0 only, found 7.5"),
    ],
)
def test_compute_capability_reasons(
    name: str, capability: tuple[int, int], reason: str, fake_libraries: Any, pretend: Any, trusted: None
) -> None:
    pretend("cuda", capability)
    q, k, v = qkv(dtype=torch.bfloat16)
    call = CallSpec.of(q, k, v, "none", 0.0, False, None)
    assert any(r.startswith(reason) for r in registry.get_backend(name).call_reasons(call)), registry.get_backend(
        name
    ).call_reasons(call)


def test_rocm_only_backends_refuse_nvidia(fake_libraries: Any, pretend: Any, trusted: None) -> None:
    pretend("cuda", (9, 0), rocm=False)
    assert ROCM_REASON in registry.get_backend("aiter").reasons
    assert ROCM_REASON in registry.get_backend("aiter_fa2_hub").reasons


def test_cpu_tensors_are_refused(fake_libraries: Any) -> None:
    """Without pretend, the fakes are installed but CPU tensors are not a GPU: fall back, with the reason."""
    q, k, v = qkv()
    with pytest.warns(AttnpatchWarning, match="'flash' cannot serve this call .*needs a CUDA GPU"):
        out = dispatch.dispatch_attention(q, k, v, backend="flash")
    assert_matches(out, expected(q, k, v))
    assert not fake_flash_attn.calls


# ----- argument mapping, layout, scale, GQA, causal: every backend against the reference -----------------------

SCENARIOS = {
    "plain": {},
    "scale": {"scale": 0.3},
    "gqa": {"heads_kv": 2},
    "mqa_cross": {"heads_kv": 1, "seq_kv": 20},
    "causal": {"is_causal": True},
    "causal_cross": {"is_causal": True, "seq_q": 8, "seq_kv": 12},
}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", TABLE)
def test_scenarios(name: str, scenario: str, fake_libraries: Any, pretend: Any, strict: None, trusted: None) -> None:
    dtype, head_dim, module, function = setup_backend(name, pretend)
    options = dict(SCENARIOS[scenario])
    scale = options.pop("scale", None)
    is_causal = options.pop("is_causal", False)
    q, k, v = qkv(dtype=dtype, head_dim=head_dim, **options)
    refusal = REFUSALS.get((name, scenario))
    if refusal is not None:
        with pytest.raises(UnsupportedCall, match=refusal):
            dispatch.dispatch_attention(q, k, v, is_causal=is_causal, scale=scale, backend=name)
        assert not calls_of(module, function)
        return
    out = dispatch.dispatch_attention(q, k, v, is_causal=is_causal, scale=scale, backend=name)
    assert_matches(out, expected(q, k, v, is_causal=is_causal, scale=scale))
    assert len(calls_of(module, function)) == 1, "the library was not called exactly once"


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


@pytest.mark.parametrize("name", ["flash", "xformers", "aiter", "_native_npu"])
def test_dropout_is_passed(name: str, fake_libraries: Any, pretend: Any, strict: None) -> None:
    dtype, head_dim, module, function = setup_backend(name, pretend)
    q, k, v = qkv(dtype=dtype, head_dim=head_dim)
    torch.manual_seed(0)
    out = dispatch.dispatch_attention(q, k, v, dropout_p=0.25, backend=name)
    (call,) = calls_of(module, function)
    passed = call.get("dropout_p", call.get("p", None))
    assert passed == 0.25 or call.get("keep_prob") == 0.75
    assert not torch.allclose(out.float(), expected(q, k, v).float(), atol=1e-2)


@pytest.mark.parametrize("name", ["_flash_3", "_native_xla", *SAGE])
def test_no_dropout_is_a_reason(name: str, fake_libraries: Any, pretend: Any, strict: None) -> None:
    dtype, head_dim, module, function = setup_backend(name, pretend)
    q, k, v = qkv(dtype=dtype, head_dim=head_dim)
    with pytest.raises(UnsupportedCall, match="no dropout"):
        dispatch.dispatch_attention(q, k, v, dropout_p=0.1, backend=name)
    assert not calls_of(module, function)


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


# ----- masks -------------------------------------------------------------------------------------------------


def padding_mask(lengths: list[int], seq: int, left: bool = False) -> torch.Tensor:
    """(batch, seq) bool key padding: the first (or, left padded, the last) lengths[b] keys are real."""
    positions = torch.arange(seq)[None]
    count = torch.tensor(lengths)[:, None]
    return positions >= seq - count if left else positions < count


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
@pytest.mark.parametrize("name", VARLEN)
def test_varlen_packs_key_padding(
    name: str, left: bool, fake_libraries: Any, pretend: Any, strict: None, trusted: None
) -> None:
    dtype, head_dim, module, function = setup_backend(name, pretend)
    q, k, v = qkv(batch=3, seq_q=6, seq_kv=13, heads_kv=2, dtype=dtype, head_dim=head_dim)
    keep = padding_mask([13, 5, 0], 13, left=left)  # the last batch entry has no key at all
    out = dispatch.dispatch_attention(q, k, v, attn_mask=keep, backend=name)
    assert_matches(out, expected(q, k, v, attn_mask=keep))
    assert torch.count_nonzero(out[2]) == 0, "a query with nothing to attend gives 0"
    (call,) = calls_of(module, function)
    assert call["q"][0] == (18, 4, 64), "queries flattened, none dropped"
    assert call["k"][0] == (18, 2, 64), "only the 13 + 5 + 0 attended keys"
    assert call["cu_seqlens_k_value"].tolist() == [0, 13, 18, 18]
    assert call["cu_seqlens_q_value"].tolist() == [0, 6, 12, 18]
    assert (call["max_seqlen_q"], call["max_seqlen_k"]) == (6, 13), "padded lengths: no device sync needed"
    packed = call["k_value"]
    assert torch.equal(packed, k.flatten(0, 1)[keep.flatten()]), "the attended keys, in order"


@pytest.mark.parametrize("name", VARLEN)
def test_varlen_without_mask(name: str, fake_libraries: Any, pretend: Any, strict: None, trusted: None) -> None:
    dtype, head_dim, module, function = setup_backend(name, pretend)
    q, k, v = qkv(batch=2, seq_q=5, seq_kv=7, dtype=dtype, head_dim=head_dim)
    assert_matches(dispatch.dispatch_attention(q, k, v, backend=name), expected(q, k, v))
    (call,) = calls_of(module, function)
    assert call["cu_seqlens_k_value"].tolist() == [0, 7, 14]


@pytest.mark.parametrize("name", VARLEN)
def test_varlen_refuses_other_masks(name: str, fake_libraries: Any, pretend: Any, strict: None, trusted: None) -> None:
    dtype, head_dim, module, function = setup_backend(name, pretend)
    q, k, v = qkv(dtype=dtype, head_dim=head_dim)
    per_query = torch.rand(2, 1, 12, 12) > 0.3
    with pytest.raises(UnsupportedCall, match="does not take a bool attn_mask"):
        dispatch.dispatch_attention(q, k, v, attn_mask=per_query, backend=name)
    assert not calls_of(module, function)


def _mask(kind: str, batch: int, heads: int, seq_q: int, seq_kv: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if kind == "key_padding":
        return padding_mask([seq_kv, 0], seq_kv, left=True)[:batch]
    if kind == "bool_4d":
        keep = torch.rand(batch, heads, seq_q, seq_kv, generator=generator) > 0.4
        keep[0, 0, 0] = False  # one query row with no key
        return keep
    if kind == "bool_3d":
        return torch.rand(batch, seq_q, seq_kv, generator=generator) > 0.4
    additive = torch.randn(batch, 1, seq_q, seq_kv, generator=generator)
    additive[1, 0, 2] = float("-inf")
    return additive.masked_fill(torch.rand(batch, 1, seq_q, seq_kv, generator=generator) > 0.7, float("-inf"))


@pytest.mark.parametrize("heads_kv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("kind", ["key_padding", "bool_4d", "bool_3d", "additive"])
def test_xformers_masks_become_aligned_bias(
    kind: str, heads_kv: int, fake_libraries: Any, pretend: Any, strict: None
) -> None:
    pretend("cuda", (8, 0))
    q, k, v = qkv(seq_q=9, seq_kv=13, heads_kv=heads_kv)  # 13 keys: not a multiple of 8
    mask = _mask(kind, 2, 4, 9, 13)
    if kind == "additive":
        mask = mask.to(torch.float16)
    out = dispatch.dispatch_attention(q, k, v, attn_mask=mask, backend="xformers")
    assert_matches(out, expected(q, k, v, attn_mask=mask))
    (call,) = fake_xformers.calls
    shape, dtype, stride = call["attn_bias"]
    assert dtype == torch.float16 and all(s % 8 == 0 for s in stride[:-1])
    assert len(shape) == (4 if heads_kv == 4 else 5)


def test_xformers_causal_is_top_left(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("cuda", (8, 0))
    q, k, v = qkv(seq_q=8, seq_kv=12, heads_kv=2)
    out = dispatch.dispatch_attention(q, k, v, is_causal=True, backend="xformers")
    assert_matches(out, expected(q, k, v, is_causal=True))
    assert fake_xformers.calls[0]["attn_bias"] == "LowerTriangularMask"


def test_xformers_causal_with_mask_folds_into_bias(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("cuda", (8, 0))
    q, k, v = qkv(seq_q=8, seq_kv=8)
    keep = padding_mask([8, 3], 8)
    out = dispatch.dispatch_attention(q, k, v, attn_mask=keep, is_causal=True, backend="xformers")
    assert_matches(out, expected(q, k, v, attn_mask=keep, is_causal=True))


@pytest.mark.parametrize("kind", ["key_padding", "bool_4d", "bool_3d"])
def test_npu_masks_are_inverted(kind: str, fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("npu")
    q, k, v = qkv(seq_q=9, seq_kv=13)
    mask = _mask(kind, 2, 4, 9, 13)
    out = dispatch.dispatch_attention(q, k, v, attn_mask=mask, backend="_native_npu")
    assert_matches(out, expected(q, k, v, attn_mask=mask))
    (call,) = fake_torch_npu.calls
    normalised, _ = masks.normalize(mask, q, k)
    assert torch.equal(call["atten_mask_value"], ~normalised.expand(call["atten_mask_value"].shape))
    assert call["scale"] == 64**-0.5 and call["keep_prob"] == 1.0
    assert (call["pre_tockens"], call["next_tockens"]) == (2147483647, 2147483647)


def test_npu_causal_is_left_up(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("npu")
    q, k, v = qkv(seq_q=8, seq_kv=12, heads_kv=2)
    assert_matches(
        dispatch.dispatch_attention(q, k, v, is_causal=True, backend="_native_npu"), expected(q, k, v, is_causal=True)
    )
    assert fake_torch_npu.calls[0]["sparse_mode"] == 2


def test_npu_refuses_additive_masks(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("npu")
    q, k, v = qkv()
    with pytest.raises(UnsupportedCall, match="does not take a additive attn_mask"):
        dispatch.dispatch_attention(
            q, k, v, attn_mask=torch.zeros(2, 1, 12, 12, dtype=torch.float16), backend="_native_npu"
        )


@pytest.mark.parametrize("name", [n for n in TABLE if n not in VARLEN and n not in ("xformers", "_native_npu")])
def test_maskless_backends_refuse_masks(
    name: str, fake_libraries: Any, pretend: Any, strict: None, trusted: None
) -> None:
    """Sage in particular swallows attn_mask in **kwargs: a mask must be a reason, never silently dropped."""
    dtype, head_dim, module, function = setup_backend(name, pretend)
    q, k, v = qkv(dtype=dtype, head_dim=head_dim)
    with pytest.raises(UnsupportedCall, match="does not take a key-padding attn_mask"):
        dispatch.dispatch_attention(q, k, v, attn_mask=padding_mask([12, 4], 12), backend=name)
    assert not calls_of(module, function)


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
    q, k, v = qkv(heads_kv=2, seq_kv=10)
    before = k.clone()
    out = dispatch.dispatch_attention(q, k, v, backend="sage")
    assert_matches(out, expected(q, k, v))
    assert torch.equal(k, before), "sageattention 1.x subtracts the key mean in place: it must get a copy"
    keep = padding_mask([10, 3], 10)
    assert_matches(
        dispatch.dispatch_attention(q, k, v, attn_mask=keep, backend="sage_varlen"), expected(q, k, v, attn_mask=keep)
    )
    assert torch.equal(k, before)


def test_sage_1x_head_dims(fake_libraries: Any, pretend: Any, strict: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sageattention", fake_sageattention_v1)
    pretend("cuda", (8, 9))
    q, k, v = qkv(head_dim=80)
    with pytest.raises(UnsupportedCall, match=r"sageattention 1\.x sageattn takes head_dim 64, 96, 128, got 80"):
        dispatch.dispatch_attention(q, k, v, backend="sage")
    monkeypatch.setitem(sys.modules, "sageattention", fake_sageattention)
    _forget()
    assert_matches(dispatch.dispatch_attention(q, k, v, backend="sage"), expected(q, k, v))


@pytest.mark.parametrize("name", SAGE)
def test_sage_has_no_backward(name: str, fake_libraries: Any, pretend: Any, strict: None, trusted: None) -> None:
    dtype, head_dim, _, _ = setup_backend(name, pretend)
    q, k, v = qkv(dtype=dtype, head_dim=head_dim)
    with pytest.raises(UnsupportedCall, match="has no backward pass"):
        dispatch.dispatch_attention(q.requires_grad_(), k, v, backend=name)


@pytest.mark.parametrize("name", ["sage", "_sage_qk_int8_pv_fp8_cuda", "sage_blackwell_hub"])
def test_lossy_backends_are_never_auto_unless_allowed(
    name: str, fake_libraries: Any, pretend: Any, trusted: None
) -> None:
    pretend("cuda", (12, 0) if name == "sage_blackwell_hub" else (8, 9))
    q, k, v = qkv(dtype=torch.bfloat16)
    call = CallSpec.of(q, k, v, "none", 0.0, False, None)
    backend = registry.get_backend(name)
    assert backend.caps.lossy and not backend.call_reasons(call)
    assert backend not in dispatch.auto_candidates(call)
    selection.set_allow_lossy(True)
    try:
        ranked = dispatch.auto_candidates(call)
        assert (backend in ranked) == (name not in hub.KERNELS), "Hub kernels are never picked by auto"
        assert ranked[0].name == "sage"
    finally:
        selection.set_allow_lossy(False)


@pytest.mark.parametrize(
    ("capability", "rocm", "first"),
    # On sm80 torch's own cuDNN kernel (priority 45) ranks just above FlashAttention-2 (44), as declared in
    # backends/native.py and flash.py; emulate_device makes torch's CUDA kernels count as present too.
    [((9, 0), False, "_flash_3"), ((8, 0), False, "_native_cudnn"), ((9, 4), True, "aiter")],
)
def test_auto_order(
    capability: tuple[int, int], rocm: bool, first: str, fake_libraries: Any, pretend: Any, trusted: None
) -> None:
    pretend("cuda", capability, rocm)
    q, k, v = qkv(dtype=torch.bfloat16)
    call = CallSpec.of(q, k, v, "none", 0.0, False, None)
    ranked = [b.name for b in dispatch.auto_candidates(call)]
    assert ranked[0] == first
    assert not set(ranked) & set(hub.KERNELS) and not set(ranked) & set(SAGE)
    with_padding = CallSpec.of(q, k, v, "key_padding", 0.0, False, None)
    assert "flash" not in [b.name for b in dispatch.auto_candidates(with_padding)]


# ----- XLA: the scale diffusers drops ------------------------------------------------------------------------


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


# ----- the Hub -------------------------------------------------------------------------------------------------


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


# ----- imports, compile, backward ------------------------------------------------------------------------------


class _BrokenBuild(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A flash_attn that is installed but fails to import, like a build for another torch (undefined symbol)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self) if name == "flash_attn" else None

    def exec_module(self, module: Any) -> None:
        raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c105ErrorC2E")


def test_broken_install_is_a_reason(pretend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "meta_path", [_BrokenBuild(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    pretend("cuda", (8, 0))
    assert registry.get_backend("flash").available, "availability never imports the package"
    q, k, v = qkv()
    with pytest.warns(AttnpatchWarning, match=r"flash_attn failed to import \(ImportError: .*undefined symbol"):
        out = dispatch.dispatch_attention(q, k, v, backend="flash")
    assert_matches(out, expected(q, k, v))


def test_eager_backward_uses_the_library(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("cuda", (8, 0))
    q, k, v = (t.requires_grad_() for t in qkv(heads_kv=2))
    dispatch.dispatch_attention(q, k, v, is_causal=True, backend="flash").float().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    reference = [t.detach().double().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in reference), is_causal=True, enable_gqa=True
    ).sum().backward()
    for got, want in zip(grads, reference, strict=True):
        torch.testing.assert_close(got.double(), want.grad, atol=2e-2, rtol=2e-2)


def test_external_op_passes_opcheck(fake_libraries: Any) -> None:
    q, k, v = qkv(dtype=torch.float16, heads_kv=2)
    keep = masks.normalize(padding_mask([12, 7], 12), q, k)[0]
    for kernel, mask, causal in (("flash", None, True), ("flash_varlen", keep, False), ("xformers", keep, False)):
        args = (q.requires_grad_(kernel == "flash"), k, v, mask, 0.0, causal, 0.2, kernel)
        torch.library.opcheck(torch.ops.attnpatch.external_attention.default, args)


def test_compiled_model_has_no_graph_break(fake_libraries: Any, pretend: Any, strict: None) -> None:
    pretend("cuda", (8, 0))
    torch._dynamo.reset()

    def layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        dense = dispatch.dispatch_attention(q, k, v, is_causal=True, backend="flash")
        padded = dispatch.dispatch_attention(dense, k, v, attn_mask=keep, backend="flash_varlen")
        return padded * 2

    q, k, v = qkv(heads_kv=2)
    keep = padding_mask([12, 5], 12, left=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, keep), layer(q, k, v, keep))
    assert fake_flash_attn.calls, "the compiled graph ran the library"

    def grads(function: Any) -> list[torch.Tensor]:
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        function(*inputs, keep).float().sum().backward()
        return [t.grad for t in inputs]

    for got, want in zip(grads(compiled), grads(layer), strict=True):
        torch.testing.assert_close(got, want, atol=5e-3, rtol=5e-3)
    torch._dynamo.reset()


def test_compiled_dropout_with_backward_is_a_reason(fake_libraries: Any, pretend: Any) -> None:
    pretend("cuda", (8, 0))
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in qkv())
    compiled = torch.compile(
        lambda q, k, v: dispatch.dispatch_attention(q, k, v, dropout_p=0.1, backend="flash,native"), backend="eager"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(q, k, v)
    assert not fake_flash_attn.calls, "the replayed forward would draw another dropout mask"
    call = CallSpec("cuda", 0, torch.float16, 64, 64, 4, 4, 12, 12, "none", False, True, False, True, True)
    assert any(
        "dropout with a backward pass is not served under torch.compile" in r
        for r in registry.get_backend("flash").call_reasons(call)
    )
    torch._dynamo.reset()
