"""benchmarks/gpu_check.py, part 1 of 4: the shapes, the plan of steps, and the markdown report. No torch.

The supervisor (gpu_check.py) renders the report from the records its worker processes sent back, so this module
must import nothing heavier than the standard library: the report can be written after a worker crashed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

TARGET_ROUTED = 0.98  # routed throughput / direct throughput at the Flux shape
TARGET_AUTO = 0.03  # auto may be this much slower than the fastest exact backend
REFERENCE_ROWS = 192
UNPATCHED, UNAPPLIED = "(unpatched)", "(after unapply)"
SAGE_TAIL_FIXED = (2, 2, 0)  # attnpatch/backends/sage.py TAIL_FIXED_IN; docs/kernel-truth.md Finding 1
SAGE_TAIL_TEXT = "do not mask the last block"  # words of that refusal reason


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
    dtype: str  # "bfloat16", "float16", "float32": a torch dtype's name
    timed: bool = True  # False: correctness only

    def describe(self) -> str:
        heads = f"H={self.heads}" if self.heads == self.heads_kv else f"H={self.heads}/{self.heads_kv} (GQA)"
        seq = f"S={self.seq_q}" if self.seq_q == self.seq_kv else f"Sq={self.seq_q}, Skv={self.seq_kv}"
        return f"B={self.batch}, {seq}, {heads}, D={self.head_dim}, {self.dtype}" + (", causal" if self.causal else "")

    def flops(self) -> float:
        # Multiply-adds of QK^T and PV over the pairs a query may attend (top-left causal: min(i + 1, Skv)).
        pairs = sum(min(i + 1, self.seq_kv) for i in range(self.seq_q)) if self.causal else self.seq_q * self.seq_kv
        return 4.0 * self.batch * self.heads * pairs * self.head_dim


def _s(key: str, title: str, dims: tuple[int, ...], flags: str = "") -> Shape:
    """dims: (batch, seq_q, seq_kv, heads, heads_kv, head_dim); flags: fp16/fp32 (else bf16), causal, untimed."""
    dtype = "float16" if "fp16" in flags else "float32" if "fp32" in flags else "bfloat16"
    return Shape(key, title, *dims, causal="causal" in flags, dtype=dtype, timed="untimed" not in flags)


# Correctness only: the cases where kernels have been wrong (77 CLIP keys, lengths that are no multiple of 64,
# GQA, causal). Then the timed shapes, checked for correctness as well.
CORRECTNESS_SHAPES = (
    _s(
        "clip77_fp16",
        "CLIP text cross-attention, 4096 latents x 77 tokens, fp16",
        (2, 4096, 77, 8, 8, 64),
        "fp16 untimed",
    ),
    _s("clip77_bf16", "CLIP text cross-attention, 4096 latents x 77 tokens, bf16", (2, 4096, 77, 8, 8, 64), "untimed"),
    _s(
        "odd_self",
        "self-attention, 1000 tokens (no multiple of 64), head_dim 96",
        (2, 1000, 1000, 8, 8, 96),
        "fp16 untimed",
    ),
    _s("odd_cross", "cross-attention 1025 x 333 (no multiples of 64)", (1, 1025, 333, 16, 16, 128), "untimed"),
    _s("gqa_causal_odd", "causal GQA 16/4 at 1000 tokens", (2, 1000, 1000, 16, 4, 128), "causal untimed"),
    _s("gqa_cross", "GQA 32/8, non-causal, 512 x 640", (1, 512, 640, 32, 8, 64), "untimed"),
)
QUICK_TIMED = (
    _s("flux", "Flux 1024px (4096 image + 512 text tokens)", (1, 4608, 4608, 24, 24, 128)),
    _s("sd15", "SD 1.5 512px UNet self-attention (64x64 latents, CFG batch)", (2, 4096, 4096, 8, 8, 40), "fp16"),
    _s("sd15_cross", "SD 1.5 UNet cross-attention (77 CLIP tokens)", (2, 4096, 77, 8, 8, 40), "fp16"),
    _s("llama", "Llama-3-8B prefill 4k, GQA 32/8", (1, 4096, 4096, 32, 8, 128), "causal"),
)
FULL_EXTRA = (
    _s("sdxl", "SDXL 1024px UNet self-attention (64x64 latents, CFG batch)", (2, 4096, 4096, 10, 10, 64), "fp16"),
    _s("sdxl_cross", "SDXL 1024px UNet cross-attention (77 text tokens)", (2, 4096, 77, 10, 10, 64), "fp16"),
    _s("wan", "Wan 2.1 1.3B 480p, 81 frames (21x30x52 latent patches)", (1, 32760, 32760, 12, 12, 128)),
)
QUICK_SHAPES = CORRECTNESS_SHAPES + QUICK_TIMED
FULL_SHAPES = QUICK_SHAPES + FULL_EXTRA
CPU_SHAPES = (
    _s("tiny", "smoke: self-attention", (1, 64, 64, 2, 2, 32), "fp32"),
    _s("tiny_gqa_causal", "smoke: causal GQA", (2, 48, 48, 4, 2, 32), "fp32 causal"),
    _s("tiny_cross", "smoke: cross-attention", (1, 40, 7, 2, 2, 32), "fp32 untimed"),
    _s("tiny_clip77", "smoke: 77 keys (CLIP)", (1, 33, 77, 2, 2, 32), "fp32 untimed"),
)
ALL_SHAPES = {s.key: s for s in FULL_SHAPES + CPU_SHAPES}


# ----- the plan: one step per (shape, backend), per shape's auto pick, per (model, backend) --------------------


def kernel_step(shape: str, backend: str) -> str:
    return f"kernel/{shape}/{backend}"


def auto_step(shape: str) -> str:
    return f"auto/{shape}"


def model_step(model: str, backend: str) -> str:
    return f"model/{model}/{backend}"


def phase_of(step: str) -> str:
    kind, _, rest = step.partition("/")
    if kind == "model":
        return "models"
    return "timing" if ALL_SHAPES[rest.split("/")[0]].timed else "correctness"


def make_plan(shapes: list[Shape], backends: list[str], models: list[str], model_backends: list[str]) -> list[str]:
    """Correctness shapes first, then timed ones (each followed by its auto step), then the models."""
    steps = [kernel_step(s.key, b) for s in shapes if not s.timed for b in backends]
    for shape in (s for s in shapes if s.timed):
        steps += [kernel_step(shape.key, b) for b in backends] + [auto_step(shape.key)]
    for model in models:
        steps += [model_step(model, b) for b in (UNPATCHED, *model_backends, UNAPPLIED)]
    return steps


# ----- the report ----------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def work(flops: float) -> str:
    return f"{flops / 1e12:.2f} TFLOP" if flops >= 1e11 else f"{flops / 1e9:.3g} GFLOP"


def tflops(shape: Shape, ms: float | None) -> float | None:
    return shape.flops() / (ms * 1e-3) / 1e12 if ms else None


def ratio(record: dict[str, Any]) -> float | None:
    direct, routed = record.get("direct_ms"), record.get("routed_ms")
    return direct / routed if direct and routed else None


def render(state: dict[str, Any]) -> str:
    """The whole markdown report from the supervisor's state (see gpu_check.Supervisor.state)."""
    env = state.get("env") or {}
    records: dict[str, dict[str, Any]] = state["records"]
    shapes = [ALL_SHAPES[k] for k in state["shapes"]]
    lines = ["# GPU check: attention backends", ""]
    if state.get("incomplete"):
        lines += [f"**INCOMPLETE: {state['incomplete']}**", ""]
    lines += [
        f"- Date: {state['date']}",
        f"- Device: {env.get('device', '(no worker reported: see Errors)')}",
        f"- {env.get('software', '')}",
        f"- Libraries: {env.get('libraries', '')}",
        f"- SDPA with `enable_gqa=True` and equal heads (native always passes it): {env.get('gqa_flag', '-')}",
        f"- Command: `{state['command']}`",
        f"- Run time: {state['elapsed']:.0f} s of a {state['budget']:.0f} s budget; {state['workers']} worker "
        f"process(es); steps done: {sum(1 for s in state['plan'] if s in records)}/{len(state['plan'])}",
        "",
        "Method: each backend is called through `attnpatch.dispatch_attention(q, k, v, backend=name)` (routed) and "
        "through its library directly (the call a user would write, including the layout transposes SDPA needs), "
        "interleaved; medians of per-call CUDA-event timings after warm-up. Correctness: "
        f"{REFERENCE_ROWS} evenly spaced query rows against a float64 reference, within the backend's declared "
        "tolerance (atol shown); 'routed vs direct' is the largest difference between the two outputs. "
        "TFLOP/s counts 4*B*H*Sq*Skv*D (only attended pairs when causal). Every step runs in a worker process "
        "that the supervisor restarts after a crash or a hang, so a failure is a row, never the end of the run.",
        "",
    ]
    lines += summary(state, shapes)
    lines += sage_section(env, shapes, records)
    lines += tflops_table(shapes, state["plan"], records)
    lines += correctness_matrix(shapes, state["plan"], records)
    unavailable = env.get("unavailable") or {}
    if unavailable:
        lines += ["## Not available here", "", "| backend | why |", "|---|---|"]
        lines += [f"| {name} | {_cell('; '.join(why))} |" for name, why in unavailable.items()]
        lines.append("")
    lines += ["## Shapes", ""]
    for shape in shapes:
        lines += shape_report(shape, state, records)
    lines += models_section(state, records)
    if state.get("events"):
        lines += ["## Supervisor log", ""] + [f"- {_cell(e)}" for e in state["events"]] + [""]
    return "\n".join(lines) + "\n"


def _kernel_rows(shape: Shape, state: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for step in state["plan"]:
        if step.startswith(f"kernel/{shape.key}/"):
            rows.append({"backend": step.split("/", 2)[2], **(records.get(step) or {"status": "not run"})})
    return rows


def fastest_exact(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    timed = [r for r in rows if r.get("routed_ms") and r.get("correct") and not r.get("lossy")]
    return min(timed, key=lambda r: r["routed_ms"]) if timed else None


def summary(state: dict[str, Any], shapes: list[Shape]) -> list[str]:
    records = state["records"]
    lines = ["## Targets", ""]
    main = next((s for s in shapes if s.key in ("flux", "tiny")), None)
    if main is not None:
        ratios = [(r["backend"], ratio(r)) for r in _kernel_rows(main, state, records) if ratio(r)]
        if ratios:
            worst = min(ratios, key=lambda item: item[1] or 0.0)
            verdict = "met" if (worst[1] or 0.0) >= TARGET_ROUTED else "missed"
            lines.append(
                f"- Routed >= {TARGET_ROUTED * 100:.0f}% of the direct call's throughput at the {main.key} shape: "
                f"{verdict}; lowest {(worst[1] or 0) * 100:.1f}% ({worst[0]}); "
                + ", ".join(f"{name} {(value or 0) * 100:.1f}%" for name, value in ratios)
                + "."
            )
    for shape in shapes:
        auto = records.get(auto_step(shape.key)) or {}
        if auto.get("auto_ms") and auto.get("fastest_ms"):
            gap = auto["auto_ms"] / auto["fastest_ms"] - 1
            lines.append(
                f"- `auto` at {shape.key}: {auto['pick']}, {gap * 100:+.1f}% vs fastest ({auto['fastest']}): "
                f"{'met' if gap <= TARGET_AUTO else 'missed'}."
            )
    kernel = [(step, r) for step, r in records.items() if step.startswith("kernel/")]
    wrong = [step[7:] for step, r in kernel if r.get("correct") is False]
    failed = [step.split("/", 1)[1] for step, r in records.items() if failure(r.get("status", ""))]
    refused = sum(1 for _, r in kernel if r.get("status", "").startswith("cannot serve"))
    lines.append(f"- Outside tolerance: {', '.join(wrong) or 'none'}.")
    lines.append(f"- Errors: {', '.join(failed) or 'none'}.")
    lines.append(f"- Refusals (a backend's reasons, shown in its row): {refused}.")
    not_run = [s for s in state["plan"] if s not in records]
    skipped = [s for s, r in records.items() if r.get("status", "").startswith("skipped")]
    if not_run or skipped:
        lines.append(f"- Not run (time budget or stop): {len(not_run) + len(skipped)} step(s).")
    models = [r for s, r in records.items() if s.startswith("model/") and not s.endswith(f"/{UNPATCHED}")]
    if models:
        ok = sum(1 for r in models if r.get("status") == "ok")
        lines.append(f"- End to end (tiny models, patched vs unpatched): {ok}/{len(models)} runs ok.")
    lines.append("")
    return lines


def failure(status: str) -> bool:
    return status.startswith(("error", "crashed", "timed out", "stopped"))


def sage_section(env: dict[str, Any], shapes: list[Shape], records: dict[str, dict[str, Any]]) -> list[str]:
    """SageAttention's version rule, checked: what sage did at each shape and what its kernel does when asked."""
    version = env.get("sage_version")
    lines = ["## SageAttention version rules", ""]
    if not version:
        return [*lines, "sageattention is not installed here: nothing to check.", ""]
    numbers = tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())
    old = numbers < SAGE_TAIL_FIXED
    lines.append(
        f"sageattention {version}: "
        + (
            "older than 2.2.0, so `sage` must refuse non-causal calls whose key count is no multiple of 64 (its "
            "Triton kernels leave the last block of keys unmasked: docs/kernel-truth.md, Finding 1)."
            if old
            else "2.2.0 or newer: the tail-block rule does not apply."
        )
    )
    lines += [
        "",
        "| shape | keys | causal | sage | expected | library call at this shape |",
        "|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        record = records.get(kernel_step(shape.key, "sage"))
        if record is None:
            continue
        status = record.get("status", "")
        must_refuse = old and not shape.causal and shape.seq_kv % 64 != 0
        refused_for_tail = status.startswith("cannot serve") and SAGE_TAIL_TEXT in status
        if must_refuse:
            expected = "refuse (tail rule): **holds**" if refused_for_tail else "refuse (tail rule): **VIOLATED**"
        else:
            expected = "refused for another reason" if status.startswith("cannot serve") else "serve"
        library = record.get("library") or {}
        check = ""
        if library:
            check = library.get("status") or (
                f"max err {library['error']:.3g} (atol {library['atol']:g}), gain {library['gain']:.3f}: "
                + ("within tolerance" if library["within"] else "**wrong**: the refusal is needed")
            )
        lines.append(
            f"| {shape.key} | {shape.seq_kv} | {'yes' if shape.causal else 'no'} | {_cell(status[:160])} "
            f"| {expected} | {_cell(check)} |"
        )
    lines.append("")
    return lines


def tflops_table(shapes: list[Shape], plan: list[str], records: dict[str, dict[str, Any]]) -> list[str]:
    timed = [s for s in shapes if s.timed]
    backends = _backends(plan, timed)
    if not timed or not backends:
        return []
    lines = ["## TFLOP/s, routed (routed/direct throughput)", ""]
    lines.append("| backend | " + " | ".join(f"{s.key} ({work(s.flops())})" for s in timed) + " |")
    lines.append("|---|" + "---|" * len(timed))
    for backend in backends:
        cells = []
        for shape in timed:
            record = records.get(kernel_step(shape.key, backend)) or {"status": "not run"}
            value = tflops(shape, record.get("routed_ms"))
            if value is None:
                cells.append(_short(record.get("status", "")))
                continue
            share = ratio(record)
            cells.append(f"{value:.3g}" + (f" ({share * 100:.0f}%)" if share else ""))
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def correctness_matrix(shapes: list[Shape], plan: list[str], records: dict[str, dict[str, Any]]) -> list[str]:
    backends = _backends(plan, shapes)
    if not backends:
        return []
    lines = ["## Correctness against float64 (max abs error, or why not run)", ""]
    lines.append("| backend | " + " | ".join(s.key for s in shapes) + " |")
    lines.append("|---|" + "---|" * len(shapes))
    for backend in backends:
        cells = []
        for shape in shapes:
            record = records.get(kernel_step(shape.key, backend)) or {"status": "not run"}
            if record.get("error") is not None:
                mark = "ok" if record.get("correct") else "**WRONG**"
                cells.append(f"{mark} {record['error']:.1e}")
            else:
                cells.append(_short(record.get("status", "")))
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _backends(plan: list[str], shapes: list[Shape]) -> list[str]:
    keys = {s.key for s in shapes}
    seen: dict[str, None] = {}
    for step in plan:
        kind, _, rest = step.partition("/")
        if kind == "kernel" and rest.split("/", 1)[0] in keys:
            seen[rest.split("/", 1)[1]] = None
    return list(seen)


def _short(status: str) -> str:
    for word in ("cannot serve", "skipped", "error", "crashed", "timed out", "stopped", "not run"):
        if status.startswith(word):
            return "refused" if word == "cannot serve" else word
    return _cell(status[:20])


def shape_report(shape: Shape, state: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[str]:
    what = "timed" if shape.timed else "correctness only"
    lines = [f"### {shape.title}", "", f"{shape.describe()}; {work(shape.flops())} per call; {what}.", ""]
    lines.append(
        "| backend | result | max abs err vs fp64 (tol) | routed vs direct | direct ms | routed ms | "
        "routed/direct throughput | TFLOP/s routed |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    rows = _kernel_rows(shape, state, records)
    for row in rows:
        tolerance = f" ({row['tol'][0]:g})" if row.get("tol") else ""
        error = f"{row['error']:.2e}{tolerance}" if row.get("error") is not None else ""
        share = ratio(row)
        speed = tflops(shape, row.get("routed_ms"))
        name = row["backend"] + (" (lossy)" if row.get("lossy") else "")
        lines.append(
            f"| {name} | {_cell(row.get('status', ''))} | {error} | {_fmt(row.get('routed_vs_direct'), '.1e')} "
            f"| {_fmt(row.get('direct_ms'), '.3f')} | {_fmt(row.get('routed_ms'), '.3f')} "
            f"| {f'{share * 100:.1f}%' if share else ''} | {f'{speed:.3g}' if speed else ''} |"
        )
    auto = records.get(auto_step(shape.key))
    if shape.timed:
        lines.append("")
        fastest = fastest_exact(rows)
        if auto and auto.get("auto_ms") and auto.get("fastest_ms") and fastest is not None:
            gap = auto["auto_ms"] / auto["fastest_ms"] - 1
            verdict = "meets" if gap <= TARGET_AUTO else "misses"
            lines.append(
                f"`auto` picked **{auto['pick']}**: {auto['auto_ms']:.3f} ms; fastest exact backend "
                f"**{auto['fastest']}**, timed alongside: {auto['fastest_ms']:.3f} ms; auto is {gap * 100:+.1f}% "
                f"({verdict} the {TARGET_AUTO * 100:.0f}% target)."
            )
        elif auto:
            why = f": {auto['status']}" if auto.get("status") else ""
            lines.append(f"`auto` picked **{auto.get('pick', '?')}** (not timed{why}).")
    lines.append("")
    return lines


def models_section(state: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[str]:
    steps = [s for s in state["plan"] if s.startswith("model/")]
    if not steps:
        return []
    env = state.get("env") or {}
    lines = [
        "## End to end: tiny models (attnpatch.apply / attnpatch.unapply)",
        "",
        f"{env.get('models_note', '')} Each backend's run is compared with the unpatched run of the same model; "
        f"'{UNAPPLIED}' runs the model again after the last unapply (it must equal the unpatched run exactly).",
        "",
        "| model | backend | result | attention calls | served by | ms | max diff vs unpatched | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fallbacks: Counter[str] = Counter()
    for step in steps:
        _, model, backend = step.split("/", 2)
        record = records.get(step) or {"status": "not run"}
        served = record.get("served") or {}
        served_text = " ".join(f"{k}:{n}" for k, n in sorted(served.items(), key=lambda kv: -kv[1]))
        calls = record.get("calls")
        lines.append(
            f"| {model} | {backend} | {_cell(record.get('status', ''))} | {'' if calls is None else calls} "
            f"| {served_text} | {_fmt(record.get('ms'), '.1f')} | {_fmt(record.get('max_diff'), '.2e')} "
            f"| {_cell(record.get('note', ''))} |"
        )
        for reason, count in (record.get("fallbacks") or {}).items():
            fallbacks[f"{model} {backend} -> {reason}"] += count
    lines.append("")
    if fallbacks:
        lines.append("Fallbacks (the call ran on the next backend of the chain), with their reasons:")
        lines.append("")
        lines += [f"- {_cell(reason)} ({count} calls)" for reason, count in fallbacks.items()]
        lines.append("")
    return lines
