"""benchmarks/gpu_check.py, part 2 of 4: one backend at one shape, against float64 and against its library call.

Runs in the worker process (_gpu_check_worker.py). Each function returns a JSON-ready record for the report.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _gpu_check_report import REFERENCE_ROWS, SAGE_TAIL_TEXT, Shape
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnpatch.core import dispatch, registry
from attnpatch.core.call import MASK_NONE, CallSpec

Tensor = torch.Tensor
MATH_LIMIT_BYTES = 8e9  # the math kernel materialises the (B, H, Sq, Skv) scores in fp32
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Inputs:
    """q, k, v of one shape (B, S, H, D), the sampled query rows and their float64 reference."""

    def __init__(self, shape: Shape, device: torch.device) -> None:
        self.shape, self.device = shape, device
        generator = torch.Generator(device=device).manual_seed(0)
        dtype = DTYPES[shape.dtype]

        def make(seq: int, heads: int) -> Tensor:
            return torch.randn(shape.batch, seq, heads, shape.head_dim, generator=generator, device=device).to(dtype)

        self.q = make(shape.seq_q, shape.heads)
        self.k, self.v = make(shape.seq_kv, shape.heads_kv), make(shape.seq_kv, shape.heads_kv)
        count = min(REFERENCE_ROWS, shape.seq_q)
        self.rows = torch.linspace(0, shape.seq_q - 1, count, device=device).round().long().unique()
        self.reference = reference_rows(self.q, self.k, self.v, self.rows, shape.causal)
        self.call = CallSpec.of(self.q, self.k, self.v, MASK_NONE, 0.0, shape.causal, None)


def reference_rows(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, causal: bool) -> Tensor:
    """float64 attention for the query rows ``rows`` only: (B, R, H, Dv), computed a few heads at a time."""
    batch, _, heads, dim = q.shape
    heads_kv, seq_kv = k.shape[2], k.shape[1]
    per = heads // heads_kv
    out = torch.empty(batch, rows.numel(), heads, v.shape[-1], dtype=torch.float64, device=q.device)
    chunk = max(1, int(1e9 // (8 * batch * rows.numel() * seq_kv)))
    allowed = torch.arange(seq_kv, device=q.device)[None, :] <= rows[:, None] if causal else None
    for start in range(0, heads, chunk):
        heads_here = torch.arange(start, min(heads, start + chunk), device=q.device)
        qh = q[:, rows][:, :, heads_here].double().transpose(1, 2)
        kh = k[:, :, heads_here // per].double().transpose(1, 2)
        vh = v[:, :, heads_here // per].double().transpose(1, 2)
        scores = qh @ kh.transpose(-1, -2) * dim**-0.5
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, heads_here] = (scores.softmax(-1) @ vh).transpose(1, 2)
    return out


# ----- direct library calls ----------------------------------------------------------------------------------


def direct_call(name: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Callable[[], Tensor] | None:
    """The call a user would write without attnpatch, from (B, S, H, D) tensors; None if there is none to compare."""
    gqa = k.shape[2] != q.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if name == "native":
        return lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa).transpose(1, 2)
    pinned = {
        "_native_flash": SDPBackend.FLASH_ATTENTION,
        "_native_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "_native_cudnn": SDPBackend.CUDNN_ATTENTION,
        "_native_math": SDPBackend.MATH,
    }
    if name in pinned:
        kernel = pinned[name]
        repeat = gqa and name in ("_native_efficient", "_native_cudnn")  # no GQA in those kernels: as routed

        def sdpa() -> Tensor:
            keys, values = kt, vt
            if repeat:
                keys, values = (t.repeat_interleave(q.shape[2] // k.shape[2], dim=1) for t in (kt, vt))
            with sdpa_kernel(kernel):
                out = F.scaled_dot_product_attention(qt, keys, values, is_causal=causal, enable_gqa=gqa and not repeat)
            return out.transpose(1, 2)

        return sdpa
    if name == "flex":
        from attnpatch.backends import flex

        block_mask = flex._causal_block_mask(q.shape[1], k.shape[1], str(q.device)) if causal else None
        compiled = flex._compiled()
        return lambda: compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=gqa).transpose(1, 2)
    if name == "flash":
        flash_attn = importlib.import_module("flash_attn")
        return lambda: flash_attn.flash_attn_func(q, k, v, causal=causal)
    if name == "flash_varlen":
        flash_attn = importlib.import_module("flash_attn")
        b, sq, skv = q.shape[0], q.shape[1], k.shape[1]
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device) * sq
        cu_k = torch.arange(b + 1, dtype=torch.int32, device=q.device) * skv
        qf, kf, vf = (t.flatten(0, 1) for t in (q, k, v))
        return lambda: flash_attn.flash_attn_varlen_func(qf, kf, vf, cu_q, cu_k, sq, skv, causal=causal).unflatten(
            0, (b, sq)
        )
    if name == "_flash_3":
        fa3 = importlib.import_module("flash_attn_interface")

        def flash_3() -> Tensor:
            out = fa3.flash_attn_func(q, k, v, causal=causal)
            return out[0] if isinstance(out, tuple) else out

        return flash_3
    if name == "sage" or name.startswith("_sage_"):
        sageattention = importlib.import_module("sageattention")
        function = getattr(sageattention, "sageattn" if name == "sage" else "sageattn" + name[len("_sage") :])
        # 1.0.x subtracts the key mean in place (docs/kernel-truth.md): a copy keeps the shared key intact.
        return lambda: function(q, k.clone(), v, tensor_layout="NHD", is_causal=causal)
    if name == "xformers":
        xops = importlib.import_module("xformers.ops")
        bias = xops.LowerTriangularMask() if causal else None
        if gqa:
            per = q.shape[2] // k.shape[2]
            q5 = q.unflatten(2, (k.shape[2], per))
            k5, v5 = (t.unsqueeze(3).expand(-1, -1, -1, per, -1) for t in (k, v))
            return lambda: xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias).flatten(2, 3)
        return lambda: xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    return None


# ----- timing --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(functions: dict[str, Callable[[], Tensor]], device: torch.device, seconds: float) -> dict[str, float]:
    """Median milliseconds per call of each function: warm-up, then calls interleaved round-robin.

    On CUDA each call sits between two CUDA events; on CPU (smoke mode) perf_counter around the call.
    """
    for function in functions.values():
        for _ in range(3):
            function()
    synchronize(device)
    start = time.perf_counter()
    for function in functions.values():
        function()
    synchronize(device)
    per_round = max(time.perf_counter() - start, 1e-6)
    rounds = int(min(max(seconds / per_round, 10), 100 if device.type == "cuda" else 50))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    if device.type == "cuda":
        events: dict[str, list[tuple[Any, Any]]] = {name: [] for name in functions}
        for _ in range(rounds):
            for name, function in functions.items():
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                function()
                end.record()
                events[name].append((begin, end))
        torch.cuda.synchronize(device)
        for name, pairs in events.items():
            samples[name] = [begin.elapsed_time(end) for begin, end in pairs]
    else:
        for _ in range(rounds):
            for name, function in functions.items():
                begin_time = time.perf_counter()
                function()
                samples[name].append((time.perf_counter() - begin_time) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def gqa_flag_fact(device: torch.device) -> str:
    """Whether ``enable_gqa=True`` leaves torch's SDPA kernel choice alone where the heads are equal (``native``
    always passes it; tests/backends/test_native_gqa_flag.py checks the CPU choice). Asks the chooser only."""
    import itertools

    calls = same = 0
    differ = []
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    for dtype, head_dim, seq, masked, causal, grad in itertools.product(
        dtypes, (64, 128, 256), (128, 77), (False, True), (False, True), (False, True)
    ):
        if masked and causal:
            continue
        q, k, v = (torch.randn(1, 4, seq, head_dim, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
        mask = torch.rand(1, 1, seq, seq, device=device) > 0.2 if masked else None
        chosen = []
        with torch.set_grad_enabled(grad):
            for flag in (False, True):
                chosen.append(int(torch._fused_sdp_choice(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=flag)))
        calls += 1
        if chosen[0] == chosen[1]:
            same += 1
        else:
            differ.append(f"{dtype} d{head_dim} s{seq} mask={masked} causal={causal} grad={grad}: {chosen}")
    text = f"same kernel in {same}/{calls} kinds of call"
    return text + (f"; DIFFERENT: {'; '.join(differ[:5])}" if differ else "")


# ----- the steps -----------------------------------------------------------------------------------------------


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {text[0] if text else ''}"[:300]


def compare(out: Tensor, inputs: Inputs, atol: float, rtol: float) -> tuple[float, bool, float]:
    """(max abs error on the sampled rows, within atol + rtol*|ref|, least-squares gain g in out ~ g*ref)."""
    got = out[:, inputs.rows].double()
    difference = (got - inputs.reference).abs()
    error = float(difference.nan_to_num(float("inf")).max())
    within = bool((difference <= atol + rtol * inputs.reference.abs()).all())
    reference = inputs.reference
    gain = float((got * reference).sum() / (reference * reference).sum().clamp_min(1e-30))
    return error, within, gain


def kernel_record(name: str, inputs: Inputs, seconds: float) -> dict[str, Any]:
    """Correctness against float64 and routed-vs-direct for one backend; timings when the shape is timed."""
    backend = registry.get_backend(name)
    shape, device = inputs.shape, inputs.device
    record: dict[str, Any] = {"backend": name, "lossy": backend.caps.lossy, "status": ""}
    reasons = backend.call_reasons(inputs.call)
    if reasons:
        record["status"] = "cannot serve: " + "; ".join(reasons)
        if name == "sage" and any(SAGE_TAIL_TEXT in r for r in reasons):
            record["library"] = library_check(name, inputs, backend.caps.tolerance_for(DTYPES[shape.dtype]))
        return record
    score_bytes = 4.0 * shape.batch * shape.heads * shape.seq_q * shape.seq_kv
    if name == "_native_math" and score_bytes > MATH_LIMIT_BYTES:
        record["status"] = f"skipped: the math kernel would materialise {score_bytes / 1e9:.0f} GB of scores"
        return record
    q, k, v = inputs.q, inputs.k, inputs.v

    def routed() -> Tensor:
        return dispatch.dispatch_attention(q, k, v, is_causal=shape.causal, backend=name)

    out = routed()
    atol, rtol = backend.caps.tolerance_for(q.dtype)
    record["tol"] = [atol, rtol]
    record["error"], record["correct"], record["gain"] = compare(out, inputs, atol, rtol)
    functions: dict[str, Callable[[], Tensor]] = {"routed": routed}
    note = ""
    try:
        direct = direct_call(name, q, k, v, shape.causal)
        if direct is not None:
            record["routed_vs_direct"] = float((direct().double() - out.double()).abs().max())
            functions["direct"] = direct
    except Exception as exc:  # the routed call worked: report the direct call's failure beside it
        note = f"; direct call failed: {short_error(exc)[7:]}"
    del out
    if shape.timed:
        times = measure(functions, device, seconds)
        record["routed_ms"], record["direct_ms"] = times["routed"], times.get("direct")
    record["status"] = ("ok" if record["correct"] else "WRONG: outside tolerance") + note
    return record


def library_check(name: str, inputs: Inputs, tolerance: tuple[float, float]) -> dict[str, Any]:
    """The library's own call at a shape attnpatch refuses (SageAttention's tail rule): is the refusal needed?"""
    try:
        direct = direct_call(name, inputs.q, inputs.k, inputs.v, inputs.shape.causal)
        if direct is None:
            return {"status": "no direct call"}
        out = direct()
        synchronize(inputs.device)
    except Exception as exc:  # e.g. 1.0.x asserts head_dim in (64, 96, 128)
        return {"status": "library call: " + short_error(exc)}
    error, within, gain = compare(out, inputs, *tolerance)
    return {"error": error, "within": within, "gain": gain, "atol": tolerance[0]}


def auto_record(inputs: Inputs, fastest: str | None, seconds: float) -> dict[str, Any]:
    """Which backend ``auto`` picks, timed interleaved with the fastest exact backend measured (same conditions)."""
    candidates = dispatch.auto_candidates(inputs.call)
    record: dict[str, Any] = {"pick": candidates[0].name if candidates else "(none)", "fastest": fastest}
    if not candidates or fastest is None:
        record["status"] = "no exact backend was timed at this shape"
        return record
    q, k, v, causal = inputs.q, inputs.k, inputs.v, inputs.shape.causal
    times = measure(
        {
            "auto": lambda: dispatch.dispatch_attention(q, k, v, is_causal=causal, backend="auto"),
            "fastest": lambda: dispatch.dispatch_attention(q, k, v, is_causal=causal, backend=fastest),
        },
        inputs.device,
        seconds,
    )
    record["auto_ms"], record["fastest_ms"] = times["auto"], times["fastest"]
    return record
