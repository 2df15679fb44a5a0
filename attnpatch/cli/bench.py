"""``python -m attnpatch bench``: every available backend on realistic attention shapes, side by side.

    python -m attnpatch bench --preset flux-1024 --backends all [--json out.json] [--plot out.png]
    python -m attnpatch bench --shape 1,4096,32,128,8 --causal --backends native,flash,sage
    python -m attnpatch bench --overhead          # per-call routing cost (attnpatch.overhead)

Shapes: ``B,S,H,D[,Hkv[,Skv]]`` = batch, query sequence, query heads, head dim, key/value heads (GQA; default H)
and key/value sequence (cross-attention or decode; default S). ``--causal`` makes custom shapes causal.

For each (shape, backend): the reasons it is skipped if the backend cannot serve the shape; else the median and
minimum of ``--runs`` timed runs after ``--warmup`` runs (CUDA events on a GPU, wall clock on a CPU), TFLOP/s
(4 * B * H * D * attended query-key pairs / median), the peak memory the call adds on top of its inputs (CUDA),
the max abs error against a float64 reference and how that compares with the backend's tolerance, and the
dispatcher's overhead for that call (routing with the kernel replaced by a no-op, minus the no-op itself).

On a CPU the presets' sequence lengths are capped at ``--max-seq`` (default 256; ``--full`` for real sizes) so a
run takes seconds; the table marks scaled shapes. Ctrl-C stops the run and keeps what was measured.

JSON schema ``attnpatch.bench/1``::

    {"schema": "attnpatch.bench/1", "attnpatch": "0.1.0", "torch": "2.13.0",
     "device": "NVIDIA H100 80GB HBM3 (sm90, CUDA 12.8)", "dtype": "bfloat16",
     "settings": {"warmup": 3, "runs": 10, "max_seq": null},
     "interrupted": false,
     "left_out": {"xformers": ["xformers not installed: pip install xformers"]},  # --backends all: no rows
     "results": [{"preset": "flux-1024", "case": "joint", "batch": 1, "seq_q": 4608, "seq_kv": 4608,
                  "heads_q": 24, "heads_kv": 24, "head_dim": 128, "causal": false, "scaled_from": null,
                  "flops": 2.6e11, "backend": "flash",
                  "status": "ok",              # or "skipped" (reasons say why) or "error" (reasons hold it)
                  "reasons": [],
                  "median_ms": 1.2, "min_ms": 1.19, "runs": 10, "tflops": 215.0,
                  "peak_mem_mb": 37.8,         # null off CUDA
                  "max_abs_err": 0.0039, "tolerance": [0.03, 0.03], "within_tolerance": true,
                  "overhead_us": 0.9}]}        # keys after "reasons" are null unless status is "ok"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from attnpatch.cli._bench_cases import (
    CPU_MAX_SEQ,
    PRESETS,
    SHAPE_HELP,
    SHAPE_SYNTAX,
    BenchError,
    Case,
    presets_help,
    select_cases,
)

SCHEMA = "attnpatch.bench/1"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--overhead" in args:
        from attnpatch.cli import overhead

        args.remove("--overhead")
        return overhead.main(args)
    parser = argparse.ArgumentParser(
        prog="python -m attnpatch bench",
        description="Time every available attention backend on realistic shapes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets:\n{presets_help()}\n\nshapes: {SHAPE_HELP}\n\n"
        "--overhead: per-call routing cost instead (python -m attnpatch bench --overhead --help)",
    )
    parser.add_argument("--preset", action="append", default=[], help="a preset below (repeatable); default: all")
    parser.add_argument(
        "--shape", action="append", default=[], metavar=SHAPE_SYNTAX, help="a custom shape (repeatable)"
    )
    parser.add_argument("--causal", action="store_true", help="custom shapes are causal")
    parser.add_argument(
        "--backends", default="all", help="'all' (every backend available here) or a list such as native,flash,sage"
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default 3 on GPU, 1 on CPU)")
    parser.add_argument("--runs", type=int, help="timed runs (default 10 on GPU, 5 on CPU)")
    parser.add_argument("--max-seq", type=int, help=f"cap preset sequence lengths (default {CPU_MAX_SEQ} on CPU)")
    parser.add_argument("--full", action="store_true", help="presets at full size, also on a CPU")
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 3 runs, sequences capped at 128")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 error check")
    parser.add_argument("--json", metavar="PATH", help="write results as JSON ('-' for stdout)")
    parser.add_argument("--plot", metavar="PATH", help="bar chart of TFLOP/s (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    opts = parser.parse_args(args)
    if opts.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'attnpatch[plot]'")

    import torch

    from attnpatch.core import registry
    from attnpatch.core.call import dtype_name
    from attnpatch.errors import AttnpatchError
    from attnpatch.report import check_path

    try:  # checked now: a path that cannot be written must not cost a finished run its results
        check_path(opts.json if opts.json != "-" else None, "the results", "--json PATH")
        check_path(opts.plot, "the plot", "--plot PATH")
    except AttnpatchError as exc:
        print(f"attnpatch bench: {exc}", file=sys.stderr)
        return 2
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here (torch.cuda.is_available() is False); use --device cpu")
    on_gpu = device.type == "cuda"
    dtype = _parse_dtype(parser, opts.dtype or ("bf16" if on_gpu else "fp32"))
    max_seq = None if opts.full else (opts.max_seq or (128 if opts.quick else (None if on_gpu else CPU_MAX_SEQ)))
    warmup = opts.warmup if opts.warmup is not None else (1 if opts.quick or not on_gpu else 3)
    runs = opts.runs if opts.runs is not None else (3 if opts.quick else (10 if on_gpu else 5))
    presets = opts.preset or ([] if opts.shape else list(PRESETS))
    try:
        cases = select_cases(presets, opts.shape, opts.causal, max_seq)
        backends, left_out = select_backends(opts.backends, device.type)
    except (BenchError, registry.UnknownBackendError) as exc:
        print(f"attnpatch bench: {exc}", file=sys.stderr)
        return 2
    settings = {"warmup": warmup, "runs": runs, "max_seq": max_seq, "check": not opts.no_check}
    results: list[dict[str, Any]] = []
    progress = _Progress(len(cases) * len(backends), enabled=not opts.no_progress and sys.stderr.isatty())
    interrupted = False
    try:
        for case in cases:
            run_case(case, backends, device, dtype, warmup, runs, not opts.no_check, results, progress)
    except KeyboardInterrupt:
        interrupted = True
    progress.close()
    data = {
        "schema": SCHEMA,
        "attnpatch": _version(),
        "torch": torch.__version__,
        "device": _device_description(device),
        "dtype": dtype_name(dtype),
        "settings": settings,
        "interrupted": interrupted,
        "left_out": left_out,
        "results": results,
    }
    if opts.json == "-":
        print(json.dumps(data, indent=2))
    else:
        print(format_table(data))
        if opts.json:
            with open(opts.json, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2)
                fh.write("\n")
            print(f"JSON written to {opts.json}")
    if opts.plot and results:
        plot(data, opts.plot)
        print(f"plot written to {opts.plot}")
    if interrupted:
        print("interrupted: the table holds what was measured before Ctrl-C", file=sys.stderr)
        return 130
    return 0


def _parse_dtype(parser: argparse.ArgumentParser, text: str) -> Any:
    import torch

    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
    }
    if text.lower() not in names:
        parser.error(f"--dtype {text!r}: use bf16, fp16 or fp32")
    return names[text.lower()]


# Backends "all" leaves out on a CPU, and why; named in --backends they run. Their first call of each new shape
# compiles a kernel, which on a CPU takes seconds: more than the rest of a CPU run together.
SLOW_TO_START_ON_CPU = {"flex": "compiles a kernel for each new shape, seconds each on a CPU; name it in --backends"}


def select_backends(spec: str, device_type: str) -> tuple[list[Any], dict[str, list[str]]]:
    """(backends to measure, {not measured: reasons}) for ``--backends``.

    ``all``: every backend available in this process (on a CPU less SLOW_TO_START_ON_CPU); the unavailable ones
    come back with their reasons and get no rows. A list: exactly those, unavailable ones as skipped rows.
    """
    from attnpatch.core import registry

    if spec.strip().lower() != "all":
        return [registry.get_backend(name.strip()) for name in spec.split(",") if name.strip()], {}
    chosen, left_out = [], {}
    for backend in registry.list_backends():
        if not backend.available:
            left_out[backend.name] = list(backend.reasons)
        elif device_type == "cpu" and backend.name in SLOW_TO_START_ON_CPU:
            left_out[backend.name] = [SLOW_TO_START_ON_CPU[backend.name]]
        else:
            chosen.append(backend)
    return chosen, left_out


def run_case(
    case: Case,
    backends: list[Any],
    device: Any,
    dtype: Any,
    warmup: int,
    runs: int,
    check: bool,
    results: list[dict[str, Any]],
    progress: _Progress,
) -> None:
    """Measure ``case`` on each backend, appending one result dict per backend to ``results``."""
    import torch

    from attnpatch import verify
    from attnpatch.core.call import MASK_NONE, CallSpec

    generator = torch.Generator(device).manual_seed(0)
    query = torch.randn(
        case.batch, case.seq_q, case.heads_q, case.head_dim, device=device, dtype=dtype, generator=generator
    )
    key = torch.randn(
        case.batch, case.seq_kv, case.heads_kv, case.head_dim, device=device, dtype=dtype, generator=generator
    )
    value = torch.randn_like(key)
    args = (query, key, value, None, 0.0, case.causal, None, case.heads_kv != case.heads_q)
    with torch.no_grad():
        call = CallSpec.of(query, key, value, MASK_NONE, 0.0, case.causal, None)
    reference = None
    for backend in backends:
        progress.step(f"{case.label}: {backend.name}")
        row = _row(case, backend.name)
        reasons = backend.call_reasons(call)
        if reasons:
            row.update(status="skipped", reasons=reasons)
            results.append(row)
            continue
        try:
            with torch.no_grad():
                out, median, fastest, peak = _time(backend.fn, args, warmup, runs)
                if check and reference is None:
                    reference = verify.reference(query, key, value, None, case.causal, None)
                if reference is not None:
                    atol, rtol = backend.caps.tolerance_for(dtype)
                    max_abs, _, worst = verify.compare(out, reference, atol, rtol)
                    row.update(max_abs_err=max_abs, tolerance=[atol, rtol], within_tolerance=worst <= 1.0)
                del out
                overhead = dispatch_overhead(backend, args)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            row.update(status="error", reasons=["out of memory"])
        except Exception as exc:  # one failing backend must not end the whole benchmark
            row.update(status="error", reasons=[f"{type(exc).__name__}: {exc}".splitlines()[0][:300]])
        else:
            row.update(
                median_ms=median * 1e3,
                min_ms=fastest * 1e3,
                runs=runs,
                tflops=case.flops / median / 1e12 if median > 0 else None,
                peak_mem_mb=peak,
                overhead_us=overhead,
            )
        # Appended only once complete: a Ctrl-C inside a measurement leaves no half-filled row behind.
        results.append(row)


def _row(case: Case, backend: str) -> dict[str, Any]:
    return {
        "preset": case.preset,
        "case": case.name,
        "batch": case.batch,
        "seq_q": case.seq_q,
        "seq_kv": case.seq_kv,
        "heads_q": case.heads_q,
        "heads_kv": case.heads_kv,
        "head_dim": case.head_dim,
        "causal": case.causal,
        "scaled_from": list(case.scaled_from) if case.scaled_from else None,
        "flops": case.flops,
        "backend": backend,
        "status": "ok",
        "reasons": [],
        "median_ms": None,
        "min_ms": None,
        "runs": None,
        "tflops": None,
        "peak_mem_mb": None,
        "max_abs_err": None,
        "tolerance": None,
        "within_tolerance": None,
        "overhead_us": None,
    }


def _time(
    fn: Callable[..., Any], args: tuple[Any, ...], warmup: int, runs: int
) -> tuple[Any, float, float, float | None]:
    """(first output, median s, min s, peak MB added on CUDA or None). The first call is a warm-up run too."""
    import torch

    from attnpatch.autotune import time_call

    cuda = args[0].is_cuda
    peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out = fn(*args)
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for _ in range(max(0, warmup - 1)):
        fn(*args)
    samples = [time_call(fn, args) for _ in range(max(1, runs))]
    return out, statistics.median(samples), min(samples), peak


def dispatch_overhead(backend: Any, args: tuple[Any, ...], calls: int = 50, rounds: int = 5) -> float:
    """Microseconds the dispatcher adds to one call routed to ``backend`` with these arguments.

    The kernel is replaced by a no-op so the number is the routing alone (selection, capability check, mask
    handling), measured as the minimum over interleaved rounds of routed minus direct no-op calls.
    """
    from attnpatch.core import dispatch
    from attnpatch.core.selection import Chain

    def noop(query: Any, *rest: Any) -> Any:
        return query

    stub = dataclasses.replace(backend, fn=noop)
    chain = Chain(
        spec=backend.name, members=(stub,), implicit_native=False, fast=stub if stub.serves_every_call else None
    )
    query, key, value, mask, dropout_p, causal, scale, gqa = args
    best = math.inf
    for _ in range(rounds):
        began = time.perf_counter_ns()
        for _ in range(calls):
            dispatch.route(
                query,
                key,
                value,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=causal,
                scale=scale,
                enable_gqa=gqa,
                backend=chain,
            )
        routed = time.perf_counter_ns() - began
        began = time.perf_counter_ns()
        for _ in range(calls):
            noop(*args)
        direct = time.perf_counter_ns() - began
        best = min(best, (routed - direct) / calls / 1e3)
    return max(0.0, best)


def format_table(data: dict[str, Any]) -> str:
    ok = [r for r in data["results"] if r["status"] == "ok"]
    lines = [
        f"attnpatch bench: {data['device']}, {data['dtype']}, median of {data['settings']['runs']} runs after "
        f"{data['settings']['warmup']} warm-up" + (" (INTERRUPTED)" if data["interrupted"] else "")
    ]
    header = ["case", "shape (B x S x H x D)", "backend", "median ms", "min ms", "TFLOP/s", "peak MB", "max err"]
    header.append("overhead us")
    table = [header]
    for r in ok:
        case = f"{r['preset']} {r['case']}".strip() if r["preset"] != "custom" else "custom"
        shape = f"{r['batch']}x{r['seq_q']}x{r['heads_q']}x{r['head_dim']}"
        if r["heads_kv"] != r["heads_q"] or r["seq_kv"] != r["seq_q"]:
            shape += f" kv {r['seq_kv']}x{r['heads_kv']}"
        if r["causal"]:
            shape += " causal"
        if r["scaled_from"]:
            shape += "*"
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.1e}" + ("" if r["within_tolerance"] else " !")
        table.append(
            [
                case,
                shape,
                r["backend"],
                f"{r['median_ms']:.3f}",
                f"{r['min_ms']:.3f}",
                "-" if r["tflops"] is None else f"{r['tflops']:.3g}",
                "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}",
                err,
                f"{r['overhead_us']:.2f}",
            ]
        )
    if ok:
        from attnpatch.report import align

        lines += align(table)
    else:
        lines.append("  nothing measured")
    if any(r["scaled_from"] for r in ok):
        lines.append("  * sequence lengths capped for a CPU run (--full for real sizes)")
    if any(r["within_tolerance"] is False for r in ok):
        lines.append("  ! max error above the backend's tolerance against float64")
    skipped: dict[str, set[str]] = {}
    for r in data["results"]:
        if r["status"] != "ok":
            prefix = "error: " if r["status"] == "error" else ""
            skipped.setdefault(r["backend"], set()).update(prefix + reason for reason in r["reasons"])
    if skipped:
        lines.append("not measured:")
        lines += [f"  {name}: {'; '.join(sorted(reasons))}" for name, reasons in skipped.items()]
    left_out = data.get("left_out") or {}
    unavailable = sorted(n for n, reasons in left_out.items() if n not in SLOW_TO_START_ON_CPU)
    if unavailable:
        lines.append(f"not available here: {', '.join(unavailable)} (python -m attnpatch list says why)")
    for name in sorted(set(left_out) & set(SLOW_TO_START_ON_CPU)):
        lines.append(f"left out: {name} ({left_out[name][0]})")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: str) -> None:
    """Grouped bar chart: TFLOP/s per case, one bar per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in data["results"] if r["status"] == "ok" and r["tflops"] is not None]
    cases = list(dict.fromkeys(f"{r['preset']} {r['case']}".strip() for r in ok))
    names = list(dict.fromkeys(r["backend"] for r in ok))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    for i, name in enumerate(names):
        values = {f"{r['preset']} {r['case']}".strip(): r["tflops"] for r in ok if r["backend"] == name}
        xs = [j + i * width for j, case in enumerate(cases) if case in values]
        ax.bar(xs, [values[c] for c in cases if c in values], width, label=legend_label(name))
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(cases))], cases, rotation=20, ha="right")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"attnpatch bench: {data['device']}, {data['dtype']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def legend_label(name: str) -> str:
    """``name`` as a legend entry: matplotlib leaves labels that start with "_" out of the legend (_native_cudnn,
    _flash_3); a zero-width space in front keeps them in and looks the same."""
    return "\u200b" + name if name.startswith("_") else name


class _Progress:
    """A one-line progress bar on stderr (only on a terminal)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.began = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        filled = int(24 * (self.done - 1) / max(1, self.total))
        elapsed = time.perf_counter() - self.began
        bar = "#" * filled + "-" * (24 - filled)
        print(
            f"\r[{bar}] {self.done}/{self.total} {elapsed:5.1f}s {label[:60]:<60}", end="", file=sys.stderr, flush=True
        )

    def close(self) -> None:
        if self.enabled:
            print("\r" + " " * 100 + "\r", end="", file=sys.stderr, flush=True)


def _device_description(device: Any) -> str:
    from attnpatch.autotune import device_description

    return device_description(device)


def _version() -> str:
    from attnpatch import __version__

    return __version__
