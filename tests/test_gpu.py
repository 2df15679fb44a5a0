"""Real kernels on a real GPU, against a float64 reference (``pytest -m gpu``); skipped with a reason without one.

Parametrized over the registry: every backend that is available in this process and can serve a case is run in
strict mode (so a refusal cannot hide behind a fallback) and compared with torch's SDPA in float64 within the
backend's own declared tolerance; a backend that cannot serve a case is skipped with its own reasons. The last
tests run benchmarks/gpu_check.py in its CPU smoke mode, so the script itself is tested on every machine.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from attnpatch.core import dispatch, masks, registry, selection
from attnpatch.core.call import CallSpec

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = "needs a CUDA GPU: torch.cuda.is_available() is False"

CASES: dict[str, dict[str, Any]] = {
    "self_bf16_d128": {"batch": 2, "seq_q": 256, "seq_kv": 256, "heads": 8, "heads_kv": 8, "head_dim": 128},
    "cross_fp16_d64": {
        "batch": 2,
        "seq_q": 200,
        "seq_kv": 77,
        "heads": 8,
        "heads_kv": 8,
        "head_dim": 64,
        "dtype": torch.float16,
    },
    "gqa_causal_bf16": {
        "batch": 1,
        "seq_q": 256,
        "seq_kv": 256,
        "heads": 8,
        "heads_kv": 2,
        "head_dim": 128,
        "causal": True,
    },
    "scale_fp16_d96": {
        "batch": 1,
        "seq_q": 128,
        "seq_kv": 128,
        "heads": 4,
        "heads_kv": 4,
        "head_dim": 96,
        "dtype": torch.float16,
        "scale": 0.2,
    },
    "key_padding_fp16": {
        "batch": 3,
        "seq_q": 64,
        "seq_kv": 75,
        "heads": 4,
        "heads_kv": 4,
        "head_dim": 64,
        "dtype": torch.float16,
        "mask": "key_padding",
    },
    "bool_mask_bf16": {
        "batch": 2,
        "seq_q": 64,
        "seq_kv": 64,
        "heads": 4,
        "heads_kv": 4,
        "head_dim": 64,
        "mask": "bool",
    },
    "fp32": {"batch": 1, "seq_q": 64, "seq_kv": 64, "heads": 4, "heads_kv": 4, "head_dim": 64, "dtype": torch.float32},
}


def backend_names() -> list[Any]:
    """Every registered backend on a GPU machine; elsewhere one placeholder, skipped with the reason."""
    if not torch.cuda.is_available():
        return [pytest.param("-", marks=pytest.mark.skip(reason=NO_GPU), id="no-gpu")]
    return [backend.name for backend in registry.list_backends()]


@pytest.fixture
def strict() -> Iterator[None]:
    selection.set_strict(True)
    yield
    selection.set_strict(False)


def make_case(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    dtype = case.get("dtype", torch.bfloat16)

    def make(seq: int, heads: int) -> torch.Tensor:
        shape = (case["batch"], seq, heads, case["head_dim"])
        return torch.randn(shape, generator=generator, device="cuda").to(dtype)

    q = make(case["seq_q"], case["heads"])
    k, v = make(case["seq_kv"], case["heads_kv"]), make(case["seq_kv"], case["heads_kv"])
    mask = None
    if case.get("mask") == "key_padding":
        lengths = torch.tensor([case["seq_kv"], case["seq_kv"] // 3, 1], device="cuda")[: case["batch"]]
        mask = torch.arange(case["seq_kv"], device="cuda")[None] >= case["seq_kv"] - lengths[:, None]  # left padded
    elif case.get("mask") == "bool":
        mask = torch.rand(case["batch"], 1, case["seq_q"], case["seq_kv"], generator=generator, device="cuda") > 0.3
    return q, k, v, mask


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float | None
) -> torch.Tensor:
    normalised = masks.normalize(mask, q, k)[0] if mask is not None else None
    out = F.scaled_dot_product_attention(
        *(t.double().transpose(1, 2) for t in (q, k, v)),
        attn_mask=normalised,
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    ).transpose(1, 2)
    return masks.zero_fully_masked(out.nan_to_num(0.0), normalised)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", backend_names())
@pytest.mark.usefixtures("strict")
def test_against_float64(name: str, case: str) -> None:
    backend = registry.get_backend(name)
    spec = CASES[case]
    q, k, v, mask = make_case(spec)
    kind = masks.normalize(mask, q, k)[1] if mask is not None else "none"
    causal, scale = spec.get("causal", False), spec.get("scale")
    reasons = backend.call_reasons(CallSpec.of(q, k, v, kind, 0.0, causal, scale))
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")
    out = dispatch.dispatch_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, backend=name)
    expected = reference(q, k, v, mask, causal, scale)
    atol, rtol = backend.caps.tolerance_for(q.dtype)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("name", backend_names())
@pytest.mark.usefixtures("strict")
def test_backward_against_float64(name: str) -> None:
    backend = registry.get_backend(name)
    q, k, v, _ = make_case(CASES["gqa_causal_bf16"])
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    reasons = backend.call_reasons(CallSpec.of(q, k, v, "none", 0.0, True, None))
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")
    dispatch.dispatch_attention(q, k, v, is_causal=True, backend=name).float().square().sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference(*leaves, None, True, None).square().sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), (t.grad for t in leaves), strict=True):
        torch.testing.assert_close(got.double(), want, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", backend_names())
@pytest.mark.usefixtures("strict")
def test_compiles_without_graph_break(name: str) -> None:
    backend = registry.get_backend(name)
    q, k, v, _ = make_case(CASES["self_bf16_d128"])
    reasons = backend.call_reasons(CallSpec.of(q, k, v, "none", 0.0, False, None))
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")
    dispatch.dispatch_attention(q, k, v, backend=name)  # eager first: imports and Hub downloads happen here
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: dispatch.dispatch_attention(q, k, v, backend=name) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), dispatch.dispatch_attention(q, k, v, backend=name) * 2)
    torch._dynamo.reset()


# ----- the GPU check script, tested anywhere ---------------------------------------------------------------


def test_gpu_check_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "smoke.md"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--cpu-smoke",
            "--out",
            str(out),
            "--backends",
            "native,_native_math,_native_flash,flash,sage,xformers",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text.startswith("# GPU check: attention backends")
    assert "- Date: " in text and "- Device: " in text
    for shape in ("smoke: self-attention", "smoke: causal GQA", "smoke: cross-attention"):
        assert f"### {shape}" in text
    assert "| native | ok |" in text and "| _native_math | ok |" in text
    assert "| flash | cannot serve: " in text or "| flash | ok |" in text
    assert "Outside tolerance: none." in text and "Errors: none." in text
    assert "`auto` picked **native**" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run the full check")
def test_gpu_check_without_gpu_measures_nothing() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0
    assert "no CUDA GPU present" in result.stdout
