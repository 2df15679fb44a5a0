"""GPU check of every attention backend that can run here: correctness against float64, then timings.

    python benchmarks/gpu_check.py                      # on a CUDA GPU; writes docs/gpu-results.md
    python benchmarks/gpu_check.py --shapes flux --backends native,flash
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke.md   # tiny shapes on CPU: tests this script

For each realistic shape (Flux 1024px, SDXL self- and cross-attention, Wan 2.1 480p video, Llama prefill 4k with
GQA) and each backend that can serve it (PyTorch's SDPA kernels, compiled flex, and flash-attn, FlashAttention-3,
sageattention or xFormers when importable):

- correctness: sampled query rows of the routed output against a float64 reference, within the backend's declared
  tolerance; and the routed output against the direct library call's;
- timings: the median of CUDA-event-timed calls after warm-up, the routed call (``attnpatch.dispatch_attention``)
  and the direct library call interleaved, with TFLOP/s (4*B*H*Sq*Skv*D, only the unmasked pairs when causal);
- ``auto``: which backend it picks and how far it is from the fastest exact backend measured.

Needs only torch (and attnpatch from this checkout): no diffusers, transformers or wrapt. Without a GPU it prints
that nothing was measured and exits 0. Everything that can fail per backend (import, kernel, out of memory) is
reported in its row; a time budget (--budget) keeps the whole run under 8 minutes on an H100.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # attnpatch from this checkout, installed or not

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from attnpatch.core import dispatch, registry  # noqa: E402
from attnpatch.core.call import MASK_NONE, CallSpec  # noqa: E402

Tensor = torch.Tensor

TARGET_ROUTED = 0.98  # routed throughput / direct throughput at the Flux shape
TARGET_AUTO = 0.03  # auto may be this much slower than the fastest exact backend
MATH_LIMIT_BYTES = 8e9  # the math kernel materialises the (B, H, Sq, Skv) scores in fp32
REFERENCE_ROWS = 192


@dataclass(frozen=True)
class Shape:
    key: str
    title: str
    batch: int
    seq_q: int
    seq_kv: int
    heads: int
    heads_kv: int
    head_dim: int
    causal: bool
    dtype: torch.dtype

    def describe(self) -> str:
        heads = f"H={self.heads}" if self.heads == self.heads_kv else f"H={self.heads}/{self.heads_kv} (GQA)"
        seq = f"S={self.seq_q}" if self.seq_q == self.seq_kv else f"Sq={self.seq_q}, Skv={self.seq_kv}"
        return f"B={self.batch}, {seq}, {heads}, D={self.head_dim}, {str(self.dtype).replace('torch.', '')}" + (
            ", causal" if self.causal else ""
        )

    def flops(self) -> float:
        # Multiply-adds of QK^T and PV over the pairs a query may attend (top-left causal: min(i + 1, Skv)).
        pairs = sum(min(i + 1, self.seq_kv) for i in range(self.seq_q)) if self.causal else self.seq_q * self.seq_kv
        return 4.0 * self.batch * self.heads * pairs * self.head_dim


GPU_SHAPES = (
    Shape("flux", "Flux 1024px (4096 image + 512 text tokens)", 1, 4608, 4608, 24, 24, 128, False, torch.bfloat16),
    Shape("llama", "Llama-3-8B prefill 4k, GQA 32/8", 1, 4096, 4096, 32, 8, 128, True, torch.bfloat16),
    Shape(
        "sdxl",
        "SDXL 1024px UNet self-attention (64x64 latents, CFG batch)",
        2,
        4096,
        4096,
        10,
        10,
        64,
        False,
        torch.float16,
    ),
    Shape(
        "sdxl_cross", "SDXL 1024px UNet cross-attention (77 text tokens)", 2, 4096, 77, 10, 10, 64, False, torch.float16
    ),
    Shape(
        "wan",
        "Wan 2.1 1.3B 480p, 81 frames (21x30x52 latent patches)",
        1,
        32760,
        32760,
        12,
        12,
        128,
        False,
        torch.bfloat16,
    ),
)
CPU_SHAPES = (
    Shape("tiny", "smoke: self-attention", 1, 64, 64, 2, 2, 32, False, torch.float32),
    Shape("tiny_gqa_causal", "smoke: causal GQA", 2, 48, 48, 4, 2, 32, True, torch.float32),
    Shape("tiny_cross", "smoke: cross-attention", 1, 40, 7, 2, 2, 32, False, torch.float32),
)


@dataclass
class Row:
    backend: str
    status: str = ""
    error: float | None = None
    tolerance: tuple[float, float] | None = None
    correct: bool | None = None
    routed_vs_direct: float | None = None
    direct_ms: float | None = None
    routed_ms: float | None = None
    lossy: bool = False

    @property
    def ratio(self) -> float | None:
        if self.direct_ms is None or self.routed_ms is None:
            return None
        return self.direct_ms / self.routed_ms


@dataclass
class Result:
    shape: Shape
    rows: list[Row] = field(default_factory=list)
    auto_pick: str = ""
    auto_ms: float | None = None
    fastest_ms: float | None = None  # the fastest exact backend, timed again next to auto
    notes: list[str] = field(default_factory=list)


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
        return lambda: function(q, k, v, tensor_layout="NHD", is_causal=causal)
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


# ----- reference and timing ----------------------------------------------------------------------------------


def sampled_rows(seq_q: int, count: int, device: torch.device) -> Tensor:
    return torch.linspace(0, seq_q - 1, min(count, seq_q), device=device).round().long().unique()


def reference_rows(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, causal: bool) -> Tensor:
    """float64 attention for the query rows ``rows`` only: (B, R, H, Dv), computed a few heads at a time."""
    batch, _, heads, dim = q.shape
    heads_kv, seq_kv = k.shape[2], k.shape[1]
    per = heads // heads_kv
    out = torch.empty(batch, rows.numel(), heads, v.shape[-1], dtype=torch.float64, device=q.device)
    chunk = max(1, int(1e9 // (8 * batch * rows.numel() * seq_kv)))
    allowed = None
    if causal:
        allowed = torch.arange(seq_kv, device=q.device)[None, :] <= rows[:, None]
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
    rounds = int(min(max(seconds / per_round, 10), 50))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    if device.type == "cuda":
        events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {name: [] for name in functions}
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


# ----- the run -------------------------------------------------------------------------------------------------


def run_shape(shape: Shape, device: torch.device, names: list[str], deadline: float, seconds: float) -> Result:
    result = Result(shape)
    generator = torch.Generator(device=device).manual_seed(0)

    def make(seq: int, heads: int) -> Tensor:
        return torch.randn(shape.batch, seq, heads, shape.head_dim, generator=generator, device=device).to(shape.dtype)

    q, k, v = make(shape.seq_q, shape.heads), make(shape.seq_kv, shape.heads_kv), make(shape.seq_kv, shape.heads_kv)
    rows = sampled_rows(shape.seq_q, REFERENCE_ROWS, device)
    reference = reference_rows(q, k, v, rows, shape.causal)
    call = CallSpec.of(q, k, v, MASK_NONE, 0.0, shape.causal, None)
    score_bytes = 4.0 * shape.batch * shape.heads * shape.seq_q * shape.seq_kv
    for name in names:
        backend = registry.get_backend(name)
        row = Row(name, lossy=backend.caps.lossy)
        result.rows.append(row)
        reasons = backend.call_reasons(call)
        if reasons:
            row.status = "cannot serve: " + "; ".join(reasons)
            continue
        if name == "_native_math" and score_bytes > MATH_LIMIT_BYTES:
            row.status = f"skipped: the math kernel would materialise {score_bytes / 1e9:.0f} GB of scores"
            continue
        if time.monotonic() > deadline:
            row.status = "skipped: time budget (--budget) used up"
            continue
        try:
            measure_backend(row, backend, q, k, v, rows, reference, shape, device, seconds)
        except Exception as exc:  # one backend failing must not stop the check of the others
            row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            traceback.print_exc(file=sys.stderr)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    measure_auto(result, q, k, v, call, device, seconds, deadline)
    return result


def measure_backend(
    row: Row,
    backend: registry.Backend,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rows: Tensor,
    reference: Tensor,
    shape: Shape,
    device: torch.device,
    seconds: float,
) -> None:
    name = backend.name

    def routed() -> Tensor:
        return dispatch.dispatch_attention(q, k, v, is_causal=shape.causal, backend=name)

    out = routed()
    row.tolerance = backend.caps.tolerance_for(shape.dtype)
    difference = (out[:, rows].double() - reference).abs()
    row.error = float(difference.nan_to_num(float("inf")).max())
    atol, rtol = row.tolerance
    row.correct = bool((difference <= atol + rtol * reference.abs()).all())
    direct = direct_call(name, q, k, v, shape.causal)
    functions: dict[str, Callable[[], Tensor]] = {"routed": routed}
    if direct is not None:
        row.routed_vs_direct = float((direct().double() - out.double()).abs().max())
        functions["direct"] = direct
    del out
    times = measure(functions, device, seconds)
    row.routed_ms = times["routed"]
    row.direct_ms = times.get("direct")
    row.status = "ok" if row.correct else "WRONG: outside tolerance"


def measure_auto(
    result: Result,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    call: CallSpec,
    device: torch.device,
    seconds: float,
    deadline: float,
) -> None:
    """Which backend ``auto`` picks, timed interleaved with the fastest exact backend measured (same conditions)."""
    candidates = dispatch.auto_candidates(call)
    result.auto_pick = candidates[0].name if candidates else "(none)"
    fastest = fastest_exact(result)
    if not candidates or fastest is None or time.monotonic() > deadline:
        return
    causal = result.shape.causal
    try:
        times = measure(
            {
                "auto": lambda: dispatch.dispatch_attention(q, k, v, is_causal=causal, backend="auto"),
                "fastest": lambda: dispatch.dispatch_attention(q, k, v, is_causal=causal, backend=fastest.backend),
            },
            device,
            seconds,
        )
    except Exception as exc:  # report, and keep going
        result.notes.append(f"auto failed: {type(exc).__name__}: {exc}")
        return
    result.auto_ms, result.fastest_ms = times["auto"], times["fastest"]


# ----- the report ----------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def shape_report(result: Result) -> list[str]:
    shape = result.shape
    lines = [f"### {shape.title}", "", f"{shape.describe()}; {shape.flops() / 1e12:.2f} TFLOP per call.", ""]
    lines.append(
        "| backend | result | max abs err vs fp64 (tol) | routed vs direct | direct ms | routed ms | "
        "routed/direct throughput | TFLOP/s routed |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for row in result.rows:
        tolerance = f" ({row.tolerance[0]:g})" if row.tolerance else ""
        error = f"{row.error:.2e}{tolerance}" if row.error is not None else ""
        ratio = f"{row.ratio * 100:.1f}%" if row.ratio is not None else ""
        tflops = f"{shape.flops() / (row.routed_ms * 1e-3) / 1e12:.3g}" if row.routed_ms else ""
        name = row.backend + (" (lossy)" if row.lossy else "")
        lines.append(
            f"| {name} | {row.status} | {error} | {_fmt(row.routed_vs_direct, '.1e')} | {_fmt(row.direct_ms, '.3f')} "
            f"| {_fmt(row.routed_ms, '.3f')} | {ratio} | {tflops} |"
        )
    fastest = fastest_exact(result)
    lines.append("")
    if fastest is not None and result.auto_ms is not None and result.fastest_ms:
        gap = result.auto_ms / result.fastest_ms - 1
        verdict = "meets" if gap <= TARGET_AUTO else "misses"
        lines.append(
            f"`auto` picked **{result.auto_pick}**: {result.auto_ms:.3f} ms; fastest exact backend "
            f"**{fastest.backend}**, timed alongside: {result.fastest_ms:.3f} ms; auto is {gap * 100:+.1f}% "
            f"({verdict} the {TARGET_AUTO * 100:.0f}% target)."
        )
    else:
        lines.append(f"`auto` picked **{result.auto_pick}** (not timed).")
    lines.extend(f"Note: {note}" for note in result.notes)
    lines.append("")
    return lines


def fastest_exact(result: Result) -> Row | None:
    timed = [row for row in result.rows if row.routed_ms is not None and row.correct and not row.lossy]
    return min(timed, key=lambda row: row.routed_ms or math.inf) if timed else None


def environment(device: torch.device) -> list[str]:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = (
            f"{props.name} (compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB)"
        )
        cuda = f", CUDA {torch.version.cuda}"
    else:
        name, cuda = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)", ""
    versions = []
    for package in ("flash-attn", "flash-attn-3", "sageattention", "xformers", "triton", "kernels"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} -")
    return [
        f"- Date: {now}",
        f"- Device: {name}",
        f"- torch {torch.__version__}{cuda}, Python {platform.python_version()}",
        f"- Libraries: {', '.join(versions)}",
        f"- Command: `{' '.join(['python', 'benchmarks/gpu_check.py', *sys.argv[1:]])}`",
    ]


def report(results: list[Result], device: torch.device, started: float) -> str:
    lines = ["# GPU check: attention backends", ""]
    lines += environment(device)
    lines += [
        f"- Run time: {time.monotonic() - started:.0f} s",
        "",
        "Method: each backend is called through `attnpatch.dispatch_attention(q, k, v, backend=name)` (routed) and "
        "through its library directly (the call a user would write, including the layout transposes SDPA needs), "
        "interleaved; medians of per-call CUDA-event timings after warm-up. Correctness: "
        f"{REFERENCE_ROWS} evenly spaced query rows against a float64 reference, within the backend's declared "
        "tolerance (atol shown); 'routed vs direct' is the largest difference between the two outputs. "
        "TFLOP/s counts 4*B*H*Sq*Skv*D (only attended pairs when causal).",
        "",
    ]
    lines += summary(results)
    lines += ["## Shapes", ""]
    for result in results:
        lines += shape_report(result)
    return "\n".join(lines) + "\n"


def summary(results: list[Result]) -> list[str]:
    lines = ["## Targets", ""]
    flux = next((r for r in results if r.shape.key in ("flux", "tiny")), None)
    if flux is not None:
        ratios = [(row.backend, row.ratio) for row in flux.rows if row.ratio is not None]
        if ratios:
            worst = min(ratios, key=lambda item: item[1] or 0.0)
            verdict = "met" if (worst[1] or 0.0) >= TARGET_ROUTED else "missed"
            lines.append(
                f"- Routed >= {TARGET_ROUTED * 100:.0f}% of the direct call's throughput at the "
                f"{flux.shape.key} shape: {verdict}; lowest {worst[1] * 100:.1f}% ({worst[0]}); "
                + ", ".join(f"{name} {ratio * 100:.1f}%" for name, ratio in ratios)
                + "."
            )
    for result in results:
        fastest = fastest_exact(result)
        if fastest is not None and result.auto_ms is not None and result.fastest_ms:
            gap = result.auto_ms / result.fastest_ms - 1
            lines.append(
                f"- `auto` at {result.shape.key}: {result.auto_pick}, {gap * 100:+.1f}% vs fastest "
                f"({fastest.backend}): {'met' if gap <= TARGET_AUTO else 'missed'}."
            )
    wrong = [f"{r.shape.key}/{row.backend}" for r in results for row in r.rows if row.correct is False]
    errors = [f"{r.shape.key}/{row.backend}" for r in results for row in r.rows if row.status.startswith("error")]
    lines.append(f"- Outside tolerance: {', '.join(wrong) or 'none'}.")
    lines.append(f"- Errors: {', '.join(errors) or 'none'}.")
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, to test this script")
    parser.add_argument("--out", type=Path, help="markdown report path (default: docs/gpu-results.md on a GPU)")
    parser.add_argument("--shapes", help="comma-separated shape keys (default: all)")
    parser.add_argument("--backends", help="comma-separated backend names (default: every registered backend)")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for the measurements (default 400)")
    parser.add_argument("--seconds", type=float, default=0.4, help="measurement seconds per backend and shape")
    opts = parser.parse_args(argv)
    started = time.monotonic()
    if opts.cpu_smoke:
        device, shapes, out = torch.device("cpu"), CPU_SHAPES, opts.out
        opts.seconds = min(opts.seconds, 0.05)
    elif not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU present (torch.cuda.is_available() is False): nothing measured. "
            "Run it on a GPU machine, or with --cpu-smoke to test the script itself."
        )
        return 0
    else:
        device, shapes, out = torch.device("cuda"), GPU_SHAPES, opts.out or ROOT / "docs" / "gpu-results.md"
    if opts.shapes:
        wanted = set(opts.shapes.split(","))
        shapes = tuple(s for s in shapes if s.key in wanted)
    names = [b.name for b in registry.list_backends()]
    if opts.backends:
        names = [registry.canonical(n) for n in opts.backends.split(",")]
    deadline = started + opts.budget
    results = []
    with torch.no_grad():
        for shape in shapes:
            print(f"gpu_check: {shape.key}: {shape.describe()}", flush=True)
            result = run_shape(shape, device, names, deadline, opts.seconds)
            for row in result.rows:
                if row.routed_ms is not None or not row.status.startswith("cannot"):
                    print(
                        f"  {row.backend:32} {row.status[:60]:60} routed {_fmt(row.routed_ms, '.3f')} ms "
                        f"direct {_fmt(row.direct_ms, '.3f')} ms",
                        flush=True,
                    )
            print(f"  auto -> {result.auto_pick} {_fmt(result.auto_ms, '.3f')} ms", flush=True)
            results.append(result)
    text = report(results, device, started)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"gpu_check: wrote {out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
