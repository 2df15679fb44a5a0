"""attnpatch asks the real xFormers dispatcher (xformers 0.0.35) whether it has an operator for a call.

xformers 0.0.35 installs beside a CPU torch (``pip install xformers==0.0.35 --no-deps``; its only other
requirement, numpy, is already there). Its C++/CUDA extension does not load without libcudart, so on this machine
it offers no operator at all, but its dispatcher is plain Python: xformers/ops/fmha/dispatch.py picks operators
by ``torch.version.cuda``, and each operator's ``not_supported_reasons`` (fmha/common.py, cutlass.py, flash.py,
flash3.py) reads the device, dtype, shapes, strides and bias type of the call, ``torch.cuda.get_device_capability``
and whether it was built. ``as_on_cuda`` sets exactly those environment facts to what a CUDA install reports:

- ``torch.version.cuda = "12.8"`` (the wheel's build: cpp_lib.json says CUDA 1208),
- ``torch.cuda.get_device_capability()`` returns the capability under test,
- ``xformers.ops.fmha.common._built_with_cuda = True`` (False here only because _C.so cannot load),
- FlashAttention-2 counts as built: with no flash_attn installed, a CUDA torch makes xFormers use torch's own FA2
  (``_USE_PT_FLASH_ATTN``, flash.py), whose support rules are the same class attributes.

Every decision stays xFormers' own code. FA3 stays "not built": it never serves a call that neither FA2 nor
cutlass serves (it needs fp16/bf16, no tensor bias, capability <= 9.0). Calls are on device "cuda:0", which needs
no GPU: ``operator_reasons`` asks with shape-only tensors.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

fmha = pytest.importorskip(
    "xformers.ops.fmha", reason="xformers is not installed: pip install 'xformers>=0.0.35' --no-deps"
)

from attnpatch.backends.xformers import operator_reasons, xformers_kernel  # noqa: E402

try:
    from attnpatch.core.call import CallSpec
except ImportError:  # the flat layout before the core/ restructure
    from attnpatch.registry import CallSpec  # type: ignore[no-redef]


@contextmanager
def as_on_cuda(capability: tuple[int, int]) -> Iterator[None]:
    """xFormers as installed with a CUDA torch on a GPU of ``capability`` (see the module docstring)."""
    from xformers.ops.fmha import common, flash

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(torch.version, "cuda", "12.8")
        mp.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        mp.setattr(common, "_built_with_cuda", True)
        if not flash.FwOp.is_available():
            mp.setattr(flash.FwOp, "OPERATOR", torch.ops.aten._flash_attention_forward)
            mp.setattr(flash.BwOp, "OPERATOR", torch.ops.aten._flash_attention_backward)
        yield
    finally:
        mp.undo()


def call(
    *,
    dtype: torch.dtype = torch.float16,
    head_dim: int = 64,
    head_dim_v: int | None = None,
    heads: tuple[int, int] = (8, 8),
    seq: tuple[int, int] = (77, 77),
    mask: str = "none",
    causal: bool = False,
    dropout: bool = False,
    needs_grad: bool = False,
    device: str = "cuda",
) -> CallSpec:
    return CallSpec(
        device_type=device,
        device_index=0,
        dtype=dtype,
        head_dim=head_dim,
        head_dim_v=head_dim if head_dim_v is None else head_dim_v,
        heads_q=heads[0],
        heads_kv=heads[1],
        seq_q=seq[0],
        seq_kv=seq[1],
        mask_kind=mask,
        is_causal=causal,
        dropout=dropout,
        custom_scale=False,
        needs_grad=needs_grad,
        compiling=False,
    )


SERVED_EVERYWHERE = {
    "fp16": call(),
    "bf16": call(dtype=torch.bfloat16),
    "causal": call(causal=True),
    "gqa": call(heads=(8, 2)),
    "causal backward": call(causal=True, needs_grad=True),
    "dropout backward": call(dropout=True, needs_grad=True),
    "head_dim 256": call(head_dim=256),
}

# Served by cutlass (capability <= 9.0) only: from xformers 0.0.33 cutlass.FwOp declares
# CUDA_MAXIMUM_COMPUTE_CAPABILITY = (9, 0), and FA2 takes no tensor bias, no fp32, no top-left causal with
# seq_q != seq_kv ("Only support LowerTriangularMask if equal number ofkeys and queries"), no K != Kv.
CUTLASS_ONLY = {
    "fp32": (call(dtype=torch.float32), "dtype=torch.float32"),
    "key-padding bias": (call(mask="key_padding"), "attn_bias type is <class 'torch.Tensor'>"),
    "bool bias": (call(mask="bool", seq=(77, 13)), "attn_bias type"),
    "additive bias gqa": (call(mask="additive", heads=(8, 2)), "attn_bias type"),
    "cross causal": (call(causal=True, seq=(5, 77)), "LowerTriangularMask if equal number of"),
    "head_dim_v 128": (call(head_dim_v=128), "query.shape[-1] != value.shape[-1]"),
    "head_dim 512": (call(head_dim=512), "max(query.shape[-1], value.shape[-1]) > 256"),
}


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0), (10, 0), (12, 0)], ids=str)
@pytest.mark.parametrize("name", list(SERVED_EVERYWHERE))
def test_served_on_every_supported_gpu(name: str, capability: tuple[int, int]) -> None:
    with as_on_cuda(capability):
        assert operator_reasons(SERVED_EVERYWHERE[name]) == []


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)], ids=str)
@pytest.mark.parametrize("name", list(CUTLASS_ONLY))
def test_cutlass_serves_up_to_sm90(name: str, capability: tuple[int, int]) -> None:
    with as_on_cuda(capability):
        assert operator_reasons(CUTLASS_ONLY[name][0]) == []


@pytest.mark.parametrize("capability", [(10, 0), (12, 0)], ids=str)
@pytest.mark.parametrize("name", list(CUTLASS_ONLY))
def test_no_operator_above_sm90(name: str, capability: tuple[int, int]) -> None:
    spec, fa2_reason = CUTLASS_ONLY[name]
    with as_on_cuda(capability):
        reasons = operator_reasons(spec)
    assert reasons, f"{name} on {capability}: xFormers >= 0.0.33 has no operator for it"
    assert any("cutlassF" in r and "(too new)" in r for r in reasons), reasons
    assert any("fa2F" in r and fa2_reason in r for r in reasons), reasons


@pytest.mark.parametrize("capability", [(8, 0), (9, 0), (12, 0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [12, 36, 100])
def test_head_dim_not_multiple_of_8_in_half_precision(
    head_dim: int, dtype: torch.dtype, capability: tuple[int, int]
) -> None:
    with as_on_cuda(capability):
        reasons = operator_reasons(call(head_dim=head_dim, dtype=dtype))
    assert any("fa2F" in r and "query.shape[-1] % 8 != 0" in r for r in reasons), reasons
    assert any("cutlassF" in r for r in reasons), reasons


@pytest.mark.parametrize("capability", [(8, 0), (9, 0), (12, 0)], ids=str)
def test_gqa_with_a_backward_pass_is_refused(capability: tuple[int, int]) -> None:
    # memory_efficient_attention's docstring: "MQA/GQA is an experimental feature supported only for the forward
    # pass". With inputs that need gradients it picks the backward operator during the forward
    # (fmha/__init__.py, _fMHA.forward -> _dispatch_bw), and no backward operator has SUPPORTS_BMGHK, so the
    # 5-D layout xformers_kernel uses for GQA fails at once. The forward alone is served.
    with as_on_cuda(capability):
        assert operator_reasons(call(heads=(8, 2))) == []
        reasons = operator_reasons(call(heads=(8, 2), needs_grad=True))
    assert reasons and all(r.startswith("xformers backward operator ") for r in reasons), reasons
    assert all("operator does not support BMGHK format" in r for r in reasons), reasons


def test_head_dim_multiple_of_4_is_enough_in_fp32_up_to_sm90() -> None:
    # cutlass._minimum_gemm_alignment: 128 bits / 32-bit scalars = 4 on sm80+.
    with as_on_cuda((8, 0)):
        assert operator_reasons(call(head_dim=12, dtype=torch.float32)) == []
        assert operator_reasons(call(head_dim=6, dtype=torch.float32)) != []


def test_bf16_needs_sm80() -> None:
    with as_on_cuda((7, 5)):
        assert operator_reasons(call(dtype=torch.float16)) == []
        reasons = operator_reasons(call(dtype=torch.bfloat16))
    assert any("bf16 is only supported on A100+ GPUs" in r for r in reasons), reasons


def test_backward_is_asked_only_when_gradients_are_needed() -> None:
    with as_on_cuda((12, 0)):
        forward_only = operator_reasons(call(causal=True, seq=(5, 77)))
        with_backward = operator_reasons(call(causal=True, seq=(5, 77), needs_grad=True))
    assert not any("backward" in r for r in forward_only)
    assert any("backward operator cutlassB" in r for r in with_backward), with_backward


def test_deterministic_mode_is_part_of_the_answer() -> None:
    # fa2B is IS_DETERMINISTIC = False; with deterministic algorithms on, xFormers refuses it. On sm120 it is the
    # only backward operator, so the answer must change with the flag (and the cache must not hide that).
    spec = call(needs_grad=True)
    with as_on_cuda((12, 0)):
        assert operator_reasons(spec) == []
        torch.use_deterministic_algorithms(True)
        try:
            reasons = operator_reasons(spec)
        finally:
            torch.use_deterministic_algorithms(False)
    assert any("non-deterministic" in r for r in reasons), reasons


def test_each_reason_is_one_line_naming_the_operator() -> None:
    with as_on_cuda((12, 0)):
        reasons = operator_reasons(call(dtype=torch.float32, mask="additive", needs_grad=True))
    assert reasons
    for reason in reasons:
        assert "\n" not in reason
        assert reason.startswith(("xformers forward operator ", "xformers backward operator ")), reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_without_a_gpu_the_check_refuses_instead_of_crashing() -> None:
    # No emulation: a CPU torch cannot report a CUDA capability, and CPU tensors have no xFormers operator.
    reasons = operator_reasons(call(device="cuda"))
    assert reasons and "Torch not compiled with CUDA enabled" in reasons[0], reasons
    reasons = operator_reasons(call(device="cpu"))
    assert reasons and "device=cpu" in reasons[0], reasons


def test_the_dispatcher_itself_finds_no_operator() -> None:
    # The fact operator_reasons reports, straight from xFormers' entry point, on shape-only inputs of its own.
    class Shape(torch.Tensor):
        @staticmethod
        def __new__(cls, shape: tuple[int, ...]):  # contiguous (batch, seq, heads, head_dim)
            strides = (shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1)
            return torch.Tensor._make_wrapper_subclass(cls, shape, strides=strides, dtype=torch.float16, device="cuda")

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise RuntimeError("shape only")

    q = Shape((1, 77, 8, 12))
    inputs = fmha.Inputs(query=q, key=Shape((1, 77, 8, 12)), value=Shape((1, 77, 8, 12)))
    with as_on_cuda((9, 0)), pytest.raises(NotImplementedError, match="No operator found for"):
        fmha.dispatch._dispatch_fw(inputs, False)


def test_flash_attn_outside_the_supported_range_breaks_import(tmp_path) -> None:
    # xformers/ops/fmha/flash.py (0.0.32-0.0.35): when flash_attn is importable, xFormers imports it and raises
    # ImportError unless 2.7.1 <= version <= 2.8.4 (XFORMERS_IGNORE_FLASH_VERSION_CHECK=1 skips the check), so
    # `import xformers.ops` fails as a whole. The stand-in package has only what that code reads
    # (__version__, flash_attn_interface.flash_attn_gpu): a FAKE flash_attn 2.6.3.
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text('__version__ = "2.6.3"\n')
    (package / "flash_attn_interface.py").write_text("flash_attn_gpu = None\n")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        try:
            import xformers.ops
        except ImportError as exc:
            print(f"{{type(exc).__name__}}: {{exc}}")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "ImportError: Requires Flash-Attention version >=2.7.1,<=2.8.4 but got 2.6.3." in result.stdout


MASKS = {
    "none": None,
    "key_padding": torch.ones(2, 1, 1, 13, dtype=torch.bool),
    "bool": torch.ones(1, 1, 5, 13, dtype=torch.bool),
    "additive": torch.zeros(2, 8, 5, 13, dtype=torch.float16),
}


# The dispatcher never passes is_causal together with a mask: (mask, causal) pairs it can pass.
LAYOUTS = [(mask, False) for mask in MASKS] + [("none", True)]


@pytest.mark.parametrize("heads_kv", [8, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize(("mask", "causal"), LAYOUTS, ids=[f"{m}{'-causal' * c}" for m, c in LAYOUTS])
def test_reasons_are_asked_about_the_layout_the_kernel_passes(
    monkeypatch: pytest.MonkeyPatch, mask: str, heads_kv: int, causal: bool
) -> None:
    # What operator_reasons hands xFormers' dispatcher must be what xformers_kernel hands memory_efficient_attention
    # (but for the batch size): shapes, strides (stride 0 for the GQA expansion), bias type and bias alignment.
    import xformers.ops

    passed: list[fmha.Inputs] = []

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, **kwargs):
        passed.append(fmha.Inputs(query, key, value, attn_bias, p, scale))
        return query.new_zeros((*query.shape[:-1], value.shape[-1]))

    monkeypatch.setattr(xformers.ops, "memory_efficient_attention", memory_efficient_attention)
    query = torch.zeros(2, 5, 8, 64, dtype=torch.float16)
    key = value = torch.zeros(2, 13, heads_kv, 64, dtype=torch.float16)
    xformers_kernel(query, key, value, MASKS[mask], 0.0, causal, None, heads_kv != 8)

    asked: list[fmha.Inputs] = []
    real_dispatch_fw = fmha.dispatch._dispatch_fw
    monkeypatch.setattr(
        fmha.dispatch, "_dispatch_fw", lambda inp, grad: asked.append(inp) or real_dispatch_fw(inp, grad)
    )
    with as_on_cuda((9, 0)):
        operator_reasons(call(heads=(8, heads_kv), seq=(5, 13), mask=mask, causal=causal))

    (real,), (shape_only,) = passed, asked
    for name in ("query", "key", "value"):
        a, b = getattr(real, name), getattr(shape_only, name)
        assert (a.shape[1:], a.stride()[1:], a.dtype) == (b.shape[1:], b.stride()[1:], b.dtype), name
    assert type(real.attn_bias) is type(shape_only.attn_bias)
    if isinstance(real.attn_bias, torch.Tensor):
        for bias in (real.attn_bias, shape_only.attn_bias):
            assert bias.dtype == torch.float16 and bias.stride(-1) == 1
            assert all(stride % 8 == 0 for stride in bias.stride()[:-1]), bias.stride()
        assert real.attn_bias.shape[1:] == shape_only.attn_bias.shape[1:]


@pytest.mark.parametrize("capability", [(8, 0), (9, 0), (10, 0)], ids=["sm80", "sm90", "sm100"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_a_window_is_asked_about_as_the_tensor_bias_it_becomes(capability: tuple[int, int], dtype: torch.dtype) -> None:
    # attnpatch serves a sliding window on xformers as a bool mask turned into a tensor attn_bias: xFormers' verdict
    # on the windowed call must be the one it gives for that bias (issue #12), not the one for no mask.
    import dataclasses

    windowed = dataclasses.replace(call(dtype=dtype, seq=(33, 77)), window=True)
    with as_on_cuda(capability):
        assert operator_reasons(windowed) == operator_reasons(call(dtype=dtype, seq=(33, 77), mask="bool"))
