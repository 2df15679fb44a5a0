"""``python -m attnpatch demo``: the main job on embedded defaults, offline.

Builds a tiny Stable Diffusion pipeline, a tiny Flux pipeline and a tiny Llama (``attnpatch.tiny``: the real
diffusers/transformers classes, random weights, no download), runs each unpatched and then under every backend
available here via ``attnpatch.apply``, and prints one table: attention calls routed, which backend served
them, time, and the largest difference to the ``native`` run. It writes each image it generated (PNG, upscaled
so 32x32 pixels are visible) and a ``demo.json`` with the table into ``--out`` (default ``./attnpatch-demo``).

The unpatched row shows what the model computes without attnpatch; ``native`` must match it exactly. Backends
that cannot serve a call fall back with a reason (shown under the table); lossy backends show their error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODELS = ("sd", "flux", "llama")
UNPATCHED = "(unpatched)"
# Backends left out unless named with --backends, and why: they compile a kernel for every new shape, and the
# tiny models (Llama decoding above all, one new key length per token) bring many shapes.
SLOW_TO_START = {"flex": "compiles a kernel for each new shape, seconds each; add it with --backends"}


@dataclass
class Row:
    model: str
    backend: str
    calls: int = 0
    served: Counter[str] = field(default_factory=Counter)
    seconds: float | None = None
    max_diff: float | None = None
    note: str = ""
    output: Any = None
    fallbacks: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "attention_calls": self.calls,
            "served": dict(self.served),
            "ms": None if self.seconds is None else round(self.seconds * 1e3, 3),
            "max_diff_vs_native": self.max_diff,
            "note": self.note,
            "fallbacks": dict(self.fallbacks),
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnpatch demo", description=__doc__.split("\n\n")[1])
    parser.add_argument("--backends", help="comma-separated backends (default: every one available here)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--out", default="attnpatch-demo", help="folder for the images and demo.json")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (default 2)")
    parser.add_argument("--tokens", type=int, default=8, help="tokens Llama generates (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per row, best is shown (default 3)")
    parser.add_argument("--fast", action="store_true", help="1 step, 4 tokens, 1 timed run (for tests)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on a GPU, fp32 on a CPU")
    opts = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    from attnpatch.testing import tiny

    missing = tiny.missing()
    if missing:
        print("attnpatch demo needs diffusers and transformers: " + "; ".join(missing), file=sys.stderr)
        return 2
    models = [m.strip() for m in opts.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models {opts.models!r}: choose from {', '.join(MODELS)}")
    if opts.fast:
        opts.steps, opts.tokens, opts.repeat = 1, 4, 1

    import torch

    from attnpatch.core import registry

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here (torch.cuda.is_available() is False); use --device cpu")
    # Fused GPU kernels (flash, cuDNN, sage) take half precision only: in float32 every call would fall back.
    dtype_name = opts.dtype = opts.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    try:
        backends, left_out = choose_backends(opts.backends)
    except registry.UnknownBackendError as exc:
        print(f"attnpatch demo: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(opts.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"attnpatch demo: cannot create --out {str(out_dir)!r}: {exc.strerror or exc}", file=sys.stderr)
        return 2

    began = time.perf_counter()
    print(
        f"attnpatch demo: tiny {', '.join(models)} on {device.type} in {dtype_name}, backends: {', '.join(backends)}",
        file=sys.stderr,
    )
    rows: list[Row] = []
    written: list[str] = []  # this run's images only (the folder may hold older ones)
    jobs = workloads(opts.steps, opts.tokens, device, dtype)
    for name in models:
        job = jobs[name]
        model_rows = run_model(job, job.build(), backends, opts.repeat)
        for row in model_rows:
            saved = job.save(row, out_dir)
            if saved is not None:
                written.append(saved.name)
        rows.extend(model_rows)
    elapsed = time.perf_counter() - began
    print(format_table(rows, device, opts))
    for name, why in left_out.items():
        print(f"left out: {name} ({why})")
    images = sorted(written)
    summary = {
        "device": device.type,
        "dtype": dtype_name,
        "steps": opts.steps,
        "tokens": opts.tokens,
        "seconds": round(elapsed, 2),
        "rows": [r.as_json() for r in rows],
        "images": images,
        "left_out": left_out,
    }
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"images and demo.json written to {out_dir}/ ({len(images)} images); total {elapsed:.1f} s")
    return 0


def choose_backends(spec: str | None) -> tuple[list[str], dict[str, str]]:
    """(backends to run, {left out: why}). Default: every available backend but those slow to start."""
    from attnpatch.core import registry

    if spec:
        return [registry.get_backend(n.strip()).name for n in spec.split(",") if n.strip()], {}
    chosen, left_out = [], {}
    for backend in registry.list_backends():
        if not backend.available:
            continue
        if backend.name in SLOW_TO_START:
            left_out[backend.name] = SLOW_TO_START[backend.name]
            continue
        chosen.append(backend.name)
    chosen.sort(key=lambda n: n != "native")  # native first: every other row is compared with it
    return chosen, left_out


def run_model(job: Workload, model: Any, backends: list[str], repeat: int) -> list[Row]:
    """One row per backend plus the unpatched run; the model is unapplied after each backend."""
    import attnpatch
    from attnpatch.core import dispatch

    rows = [_measure(job.name, UNPATCHED, model, job.run, repeat)]
    for backend in backends:
        # Fallback warnings would repeat what the table shows under "fallbacks"; keep the output to the table.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attnpatch.apply(model, backend=backend)
            try:
                rows.append(_measure(job.name, backend, model, job.run, repeat, counted=True))
            finally:
                attnpatch.unapply(model)
    dispatch.reset_fallbacks()
    baseline = next((r for r in rows if r.backend == "native"), rows[0])
    for row in rows:
        if row is not baseline:
            row.max_diff, note = job.compare(row.output, baseline.output)
            row.note = "; ".join(n for n in (note, row.note) if n)
        elif row.backend == "native":
            row.max_diff = 0.0
    return rows


def _measure(name: str, backend: str, model: Any, run: Callable[[Any], Any], repeat: int, counted: bool = False) -> Row:
    from attnpatch.core import hooks

    row = Row(name, backend)

    def observe(record: hooks.CallRecord) -> None:
        row.calls += 1
        row.served[record.served] += 1
        for refused, reasons in record.refused.items():
            for reason in reasons:
                row.fallbacks[f"{refused}: {reason}"] += 1

    # The first run counts the calls (an observer slows routing a little); the timed runs go without it.
    if counted:
        hooks.add_observer(observe)
    try:
        row.output = run(model)
    finally:
        hooks.remove_observer(observe)
    times = []
    for _ in range(max(1, repeat)):
        began = time.perf_counter()
        run(model)
        times.append(time.perf_counter() - began)
    row.seconds = min(times) if times else None
    return row


# --- the three models ------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """A tiny model and what to do with it: ``run(build())`` is one generation; ``compare(a, b)`` -> (max abs
    difference, note); ``save(row, folder)`` writes what a row generated and returns the file (None: nothing)."""

    name: str
    build: Callable[[], Any]
    run: Callable[[Any], Any]
    compare: Callable[[Any, Any], tuple[float, str]]
    save: Callable[[Row, Path], Path | None]


def workloads(steps: int = 2, tokens: int = 8, device: Any = "cpu", dtype: Any = None) -> dict[str, Workload]:
    """The demo's models (also timed by benchmarks/e2e.py): name -> Workload. dtype: None keeps float32."""
    import torch

    from attnpatch.testing import tiny

    def sd_build() -> Any:
        return tiny.place(tiny.stable_diffusion_pipeline(), device, dtype)

    def sd_run(pipe: Any) -> Any:
        return pipe("a red cube", num_inference_steps=steps, generator=tiny.generator(), output_type="np").images

    def flux_build() -> Any:
        return tiny.place(tiny.flux_pipeline(), device, dtype)

    def flux_run(pipe: Any) -> Any:
        return pipe(
            "a red cube",
            num_inference_steps=steps,
            height=32,
            width=32,
            max_sequence_length=16,
            generator=tiny.generator(),
            output_type="np",
        ).images

    inputs: dict[str, Any] = {}

    def llama_build() -> Any:
        model, tokenizer = tiny.llama()
        # A left-padded batch: padding is where a wrong mask would show.
        inputs.update(tokenizer(["hello world, how are you", "hi"], return_tensors="pt", padding=True).to(device))
        return tiny.place(model, device, dtype)

    def llama_run(model: Any) -> Any:
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=model.config.pad_token_id,
            )
        return out.sequences, torch.stack(out.scores).float()

    def llama_compare(output: Any, baseline: Any) -> tuple[float, str]:
        same = torch.equal(output[0], baseline[0])
        return float((output[1] - baseline[1]).abs().max()), "same tokens" if same else "tokens differ"

    return {
        "sd": Workload("sd", sd_build, sd_run, _image_compare, _save_image),
        "flux": Workload("flux", flux_build, flux_run, _image_compare, _save_image),
        "llama": Workload("llama", llama_build, llama_run, llama_compare, lambda row, folder: None),
    }


def _image_compare(output: Any, baseline: Any) -> tuple[float, str]:
    return float(abs(output.astype("float64") - baseline.astype("float64")).max()), ""


def _save_image(row: Row, out_dir: Path) -> Path | None:
    try:
        from PIL import Image
    except ImportError:  # diffusers needs PIL, so this is rare; the table is the main result
        return None
    pixels = (row.output[0].clip(0, 1) * 255).round().astype("uint8")
    image = Image.fromarray(pixels).resize((pixels.shape[1] * 4, pixels.shape[0] * 4), Image.Resampling.NEAREST)
    backend = row.backend.strip("()").replace(",", "+")
    path = out_dir / f"{row.model}-{backend}.png"
    image.save(path)
    return path


def format_table(rows: list[Row], device: Any, opts: argparse.Namespace) -> str:
    from attnpatch.report import align

    header = ["model", "backend", "attention calls", "served by", "ms", "max diff vs native", "note"]
    table = [header]
    for row in rows:
        served = " ".join(f"{k}:{n}" for k, n in row.served.most_common()) if len(row.served) > 1 else ""
        if len(row.served) == 1:
            served = next(iter(row.served))
        table.append(
            [
                row.model,
                row.backend,
                str(row.calls) if row.backend != UNPATCHED else "-",
                served or "-",
                "-" if row.seconds is None else f"{row.seconds * 1e3:.1f}",
                "-" if row.max_diff is None else f"{row.max_diff:.2e}",
                row.note,
            ]
        )
    ran = {row.model for row in rows}
    what = [f"diffusion {opts.steps} step(s) at 32x32"] if ran & {"sd", "flux"} else []
    what += [f"Llama greedy {opts.tokens} tokens on a left-padded batch"] if "llama" in ran else []
    lines = [f"tiny models on {device.type} ({opts.dtype}): {', '.join(what)}; ms = best of {max(1, opts.repeat)}"]
    lines += align(table, indent="")
    reasons = Counter[str]()
    for row in rows:
        for reason, n in row.fallbacks.items():
            reasons[f"{row.model} {row.backend} -> {reason}"] += n
    if reasons:
        lines.append("fallbacks (the call ran on the next backend of the chain):")
        lines += [f"  {r} ({n} calls)" for r, n in reasons.items()]
    return "\n".join(lines)
