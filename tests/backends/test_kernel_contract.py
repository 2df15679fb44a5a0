"""Contract tests of every kernel backend: registration, availability, the reference scenarios, auto, compile and
backward (fakes of the library; see kernel_setup.py)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fakes import (
    fake_flash_attn,
    fake_kernels,
    fake_sageattention,
    fake_xformers,
)
from kernel_setup import (
    REFUSALS,
    ROCM_REASON,
    SAGE,
    SETUP,
    TABLE,
    VARLEN,
    assert_matches,
    calls_of,
    expected,
    forget,
    padding_mask,
    qkv,
    setup_backend,
)

from attnpatch.backends import _probe, hub
from attnpatch.core import dispatch, masks, registry, selection
from attnpatch.core.call import CallSpec
from attnpatch.errors import AttnpatchWarning, UnsupportedCall

DOCS = (Path(__file__).resolve().parents[2] / "docs" / "backends.md").read_text()


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
    "flash_4": "flash_attn.cute not installed: pip install 'flash-attn-4>=4.0.0b5'",
    # amd-aiter exists as pre-releases only: the specifier names one, so pip takes it without --pre
    "aiter": "aiter not installed: pip install 'amd-aiter>=0.1.5.dev0'",
    "xformers": "xformers not installed: pip install xformers",
    # both must match the installed torch release: an unpinned install replaces torch (torch-npu) or fails to load
    "_native_xla": f"torch_xla not installed: pip install 'torch-xla[tpu]=={torch.__version__.split('+')[0]}'",
    "_native_npu": f"torch_npu not installed: pip install 'torch-npu=={torch.__version__.split('+')[0]}.*'",
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
        "print(sorted(m for m in ('flash_attn', 'flash_attn.cute', 'flash_attn_interface', 'sageattention', "
        "'xformers', 'aiter', 'torch_xla', 'torch_npu', 'kernels', 'triton') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_version_too_old(fake_libraries: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_flash_attn, "__version__", "2.5.0")
    monkeypatch.setattr(fake_xformers, "__version__", "0.0.28.post3")
    monkeypatch.setattr(fake_sageattention, "__version__", "2.1.0")
    monkeypatch.setattr(fake_kernels, "__version__", "0.11.7")
    forget()
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
        ("_flash_3", (7, 5), "needs compute capability >= 8.0, found 7.5"),
        ("_flash_3", (10, 0), "runs on compute capability <= 9.0, found 10.0"),
        ("_flash_3", (12, 0), "runs on compute capability <= 9.0, found 12.0"),
        ("flash_4", (7, 5), "needs compute capability >= 8.0, found 7.5"),
        # the fake has no flash-attn-4 metadata, and the Hub build's release is unknown: every release's rules
        ("flash_4", (13, 0), "FlashAttention-4 of unknown release runs on compute capability 9.x-11.x, found 13.0"),
        ("flash_4_hub", (12, 0), "FlashAttention-4 of unknown release runs on compute capability 9.x-11.x, found"),
        ("_sage_qk_int8_pv_fp8_cuda_sm90", (8, 9), "needs compute capability >= 9.0, found 8.9"),
        ("_sage_qk_int8_pv_fp8_cuda", (8, 6), "needs compute capability >= 8.9, found 8.6"),
        ("sage", (8, 7), "runs on compute capability 8.0, 8.6, 8.9, 9.0, 12.0 (the architectures sageattn"),
        ("sage_varlen", (12, 0), "SageAttention's Triton kernels are not usable on compute capability 12.x"),
        ("sage_blackwell_hub", (10, 0), "needs compute capability >= 12.0, found 10.0"),
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


@pytest.mark.parametrize("name", ["_flash_3", "_flash_varlen_3", "flash_4", "flash_4_hub"])
def test_nvidia_only_backends_refuse_amd(name: str, fake_libraries: Any, pretend: Any, trusted: None) -> None:
    """An MI250 reports compute capability 9.0 (an MI300 9.4): within FA3's and FA4's ranges, yet not NVIDIA."""
    pretend("cuda", (9, 0), rocm=True)
    q, k, v = qkv(dtype=torch.bfloat16)
    call = CallSpec.of(q, k, v, "none", 0.0, False, None)
    backend = registry.get_backend(name)
    reasons = backend.reasons + (backend.call_reasons(call) if backend.available else [])
    assert any("needs an NVIDIA GPU: this is a ROCm build of torch" in reason for reason in reasons), reasons


def test_cpu_tensors_are_refused(fake_libraries: Any) -> None:
    """Without pretend, the fakes are installed but CPU tensors are not a GPU: fall back, with the reason."""
    q, k, v = qkv()
    with pytest.warns(AttnpatchWarning, match="'flash' cannot serve this call .*needs a CUDA GPU"):
        out = dispatch.dispatch_attention(q, k, v, backend="flash")
    assert_matches(out, expected(q, k, v))
    assert not fake_flash_attn.calls


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
    # FlashAttention-3 (60) runs on sm80 and sm90 (hopper/flash_api.cpp: major >= 8), above torch's cuDNN (45) and
    # FlashAttention-2 (44); FlashAttention-4 (58) comes next, and first on sm100 where FA3 has no kernel image.
    # emulate_device makes torch's CUDA kernels count as present too.
    [
        ((9, 0), False, "_flash_3"),
        ((8, 0), False, "_flash_3"),
        ((8, 6), False, "_flash_3"),
        ((10, 0), False, "flash_4"),
        ((9, 4), True, "aiter"),
    ],
)
def test_auto_order(
    capability: tuple[int, int], rocm: bool, first: str, fake_libraries: Any, pretend: Any, trusted: None
) -> None:
    pretend("cuda", capability, rocm)
    q, k, v = qkv(dtype=torch.bfloat16)
    call = CallSpec.of(q, k, v, "none", 0.0, False, None)
    ranked = [b.name for b in dispatch.auto_candidates(call)]
    assert ranked[0] == first
    if "_flash_3" in ranked and "flash_4" in ranked:
        assert ranked.index("_flash_3") < ranked.index("flash_4"), "FA3 is the kernel written for Hopper"
    assert not set(ranked) & set(hub.KERNELS) and not set(ranked) & set(SAGE)
    with_padding = CallSpec.of(q, k, v, "key_padding", 0.0, False, None)
    assert "flash" not in [b.name for b in dispatch.auto_candidates(with_padding)]


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
    match = r"flash_attn failed to import \(ImportError: .*undefined symbol.*\): built for another torch: reinstall it"
    with pytest.warns(AttnpatchWarning, match=match):
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
