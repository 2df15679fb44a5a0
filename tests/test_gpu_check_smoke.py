"""benchmarks/gpu_check.py end to end on CPU (``--cpu-smoke``): the report's sections and rows, failures as rows.

The script is what a short GPU window runs (docs/gpu.md), so it must work the first time it meets a GPU: these
tests run it for real, worker processes, supervisor and tiny models included, on tiny shapes on the CPU. The
failures a GPU can bring (a kernel that segfaults, one that hangs, one that raises, a run past its budget) are
injected with the script's hidden ``--fault STEP=crash|hang|raise`` option.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
HAVE_MODELS = all(importlib.util.find_spec(m) is not None for m in ("diffusers", "transformers"))


def run(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - began


def test_cpu_smoke_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "smoke.md"
    models = "flux,llama" if HAVE_MODELS else "none"
    result, seconds = run(
        "--cpu-smoke",
        "--out",
        str(out),
        "--backends",
        "native,_native_math,_native_flash,flash,sage,xformers",
        "--models",
        models,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert seconds < 60, f"the CPU smoke run took {seconds:.0f} s"
    text = out.read_text()
    assert text.startswith("# GPU check: attention backends")
    for line in (
        "- Date: ",
        "- Device: CPU",
        "- torch ",
        "- Libraries: ",
        "- SDPA with `enable_gqa=True` and equal heads (native always passes it): same kernel in 108/108 kinds",
        "- Command: `python benchmarks/gpu_check.py",
    ):
        assert f"\n{line}" in text, line
    sections = ["## Targets", "## SageAttention version rules", "## TFLOP/s, routed", "## Correctness against float64"]
    sections += ["## Shapes"] + (["## End to end: tiny models"] if HAVE_MODELS else [])
    positions = [text.index(section) for section in sections]
    assert positions == sorted(positions)
    for shape in ("smoke: self-attention", "smoke: causal GQA", "smoke: cross-attention", "smoke: 77 keys (CLIP)"):
        assert f"### {shape}" in text
    assert "| native | ok |" in text and "| _native_math | ok |" in text
    assert "| flash | cannot serve: " in text and "| sage (lossy) | cannot serve: " in text
    assert "Outside tolerance: none." in text and "Errors: none." in text
    assert "`auto` picked **native**" in text
    assert "steps done: " in text and "INCOMPLETE" not in text
    done, planned = text.split("steps done: ")[1].split()[0].split("/")
    assert done == planned
    if HAVE_MODELS:
        for model in ("flux", "llama"):
            assert f"| {model} | (unpatched) | ok |" in text
            assert f"| {model} | native | ok |" in text
            assert f"| {model} | (after unapply) | ok |" in text
        ok, runs = text.split("patched vs unpatched): ")[1].split()[0].split("/")
        assert ok == runs == "8"  # 3 backends and the run after unapply, for each model


def test_failures_are_rows(tmp_path: Path) -> None:
    out = tmp_path / "faults.md"
    result, _ = run(
        "--cpu-smoke",
        "--out",
        str(out),
        "--shapes",
        "tiny_cross,tiny_clip77,tiny",
        "--backends",
        "native,_native_math",
        "--models",
        "none",
        "--step-timeout",
        "5",
        "--fault",
        "kernel/tiny_cross/_native_math=crash",
        "--fault",
        "kernel/tiny_clip77/native=raise",
        "--fault",
        "kernel/tiny_clip77/_native_math=crash",
        "--fault",
        "kernel/tiny/native=hang",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "| native | ok |" in text  # tiny_cross, before the first crash
    assert text.count("| _native_math | crashed: killed by SIGABRT") == 2
    assert "| native | error: RuntimeError: fault injected by --fault |" in text
    assert "| native | timed out after 5 s (--step-timeout): worker killed |" in text
    # Two crashes: the backend's remaining steps are skipped rather than crash a worker each.
    assert "| _native_math | skipped: _native_math crashed or hung its worker earlier in this run |" in text
    assert "- Errors: tiny_cross/_native_math, tiny_clip77/native, tiny_clip77/_native_math, tiny/native." in text
    assert "4 worker process(es)" in text and "steps done: 7/7" in text
    assert "## Supervisor log" in text and "killed by SIGABRT" in text


def test_budget_ends_the_run(tmp_path: Path) -> None:
    out = tmp_path / "budget.md"
    result, seconds = run(
        "--cpu-smoke",
        "--out",
        str(out),
        "--shapes",
        "tiny",
        "--backends",
        "native,_native_math",
        "--models",
        "none",
        "--budget",
        "8",
        "--fault",
        "kernel/tiny/native=hang",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert seconds < 30
    text = out.read_text()
    assert "**INCOMPLETE: the time budget (--budget 8 s) ran out**" in text
    assert "| native | stopped: the time budget (--budget 8 s) ran out during this step |" in text
    assert "| _native_math | not run |" in text
    assert "INCOMPLETE" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: --quick would run the whole check")
def test_quick_without_gpu_measures_nothing() -> None:
    result, _ = run("--quick")
    assert result.returncode == 0
    assert "no CUDA GPU present" in result.stdout


def test_sage_rule_is_checked_in_the_report() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _gpu_check_report as report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    tail = "cannot serve: sageattention 1.0.6's Triton kernels do not mask the last block of 64 keys: ..."
    plan = [report.kernel_step(key, "sage") for key in ("clip77_fp16", "clip77_bf16", "flux", "llama")]
    records = {
        plan[0]: {
            "backend": "sage",
            "status": tail,
            "library": {"error": 0.3, "atol": 0.08, "gain": 0.7, "within": False},
        },
        plan[1]: {"backend": "sage", "status": "ok", "error": 0.3, "correct": False, "lossy": True},
        plan[2]: {"backend": "sage", "status": "ok", "error": 0.02, "correct": True, "lossy": True},
        plan[3]: {"backend": "sage", "status": "ok", "error": 0.02, "correct": True, "lossy": True},
    }
    state = {
        "date": "today",
        "command": "python benchmarks/gpu_check.py --quick",
        "elapsed": 1.0,
        "budget": 420.0,
        "workers": 1,
        "env": {"device": "NVIDIA H100", "sage_version": "1.0.6"},
        "plan": plan,
        "shapes": ["clip77_fp16", "clip77_bf16", "flux", "llama"],
        "records": records,
        "events": [],
        "incomplete": "",
    }
    text = report.render(state)
    assert "sageattention 1.0.6: older than 2.2.0" in text
    assert "| clip77_fp16 | 77 | no | cannot serve:" in text and "refuse (tail rule): **holds**" in text
    assert "gain 0.700: **wrong**: the refusal is needed" in text
    assert "| clip77_bf16 | 77 | no | ok | refuse (tail rule): **VIOLATED**" in text
    assert "| flux | 4608 | no | ok | serve |" in text and "| llama | 4096 | yes | ok | serve |" in text
    assert "- Outside tolerance: clip77_bf16/sage." in text
    state["env"]["sage_version"] = "2.2.0"
    assert "2.2.0 or newer: the tail-block rule does not apply" in report.render(state)
