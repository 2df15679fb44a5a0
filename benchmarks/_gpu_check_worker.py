"""benchmarks/gpu_check.py, part 4 of 4: the worker process, which runs the steps and reports each as a JSON line.

Started by the supervisor (gpu_check.py) as ``python benchmarks/gpu_check.py --worker CONFIG.json``. It writes to
the events file, one JSON object a line: ``env`` (device, versions, backends), ``plan`` (every step, in order,
the same in every worker of one run), then ``start`` and ``done`` for each step it runs. It skips the steps the
config lists as done. After a CUDA error that leaves the context unusable it exits with RESTART, and the
supervisor starts a fresh worker for the remaining steps.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

RESTART = 75  # exit status: the CUDA context is broken, start another worker
LIBRARIES = (
    "triton",
    "sageattention",
    "xformers",
    "flash-attn",
    "flash-attn-3",
    "kernels",
    "diffusers",
    "transformers",
    "huggingface-hub",
    "safetensors",
    "regex",
    "pillow",
    "wrapt",
    "numpy",
)
BROKEN_CONTEXT = ("illegal memory access", "device-side assert", "unspecified launch failure", "CUDA error")


class Worker:
    def __init__(self, config: dict[str, Any], events: TextIO) -> None:
        self.config, self.events = config, events
        self.records: dict[str, dict[str, Any]] = dict(config.get("records", {}))
        self.inputs: Any = None
        self.models: Any = None

    def emit(self, **event: Any) -> None:
        self.events.write(json.dumps(event, default=str) + "\n")
        self.events.flush()

    # ----- setup -------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch
        from _gpu_check_report import ALL_SHAPES, make_plan

        from attnpatch.core import registry

        self.torch = torch
        smoke = self.config["cpu_smoke"]
        self.device = torch.device("cpu" if smoke else "cuda")
        if self.device.type == "cuda":
            torch.cuda.init()
        names, unknown = [], []
        if self.config["backends"]:
            for name in self.config["backends"]:
                try:
                    names.append(registry.canonical(name))
                except registry.UnknownBackendError:
                    unknown.append(name)
            unavailable = {}
        else:
            everything = registry.list_backends()
            names = [b.name for b in everything if b.available]
            names.sort(key=lambda n: (n != "native", n == "flex"))  # native's row first; flex compiles: last
            unavailable = {b.name: list(b.reasons) for b in everything if not b.available}
        # flex compiles per shape: last, so a slow compile only costs what is left.
        model_backends = [n for n in names if registry.get_backend(n).available]
        model_backends.sort(key=lambda n: (n != "native", n == "flex"))
        shapes = [ALL_SHAPES[key] for key in self.config["shapes"]]
        # A restarted worker runs the first worker's plan, whatever it finds available now.
        plan = self.config["plan"] or make_plan(shapes, names, self.config["models"], model_backends)
        self.emit(event="env", env=self.environment(unavailable, unknown))
        self.emit(event="plan", steps=plan)
        self.plan = plan

    def environment(self, unavailable: dict[str, list[str]], unknown: list[str]) -> dict[str, Any]:
        torch = self.torch
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            device = (
                f"{props.name} (compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
                f"{props.total_memory / 2**30:.0f} GiB)"
            )
            cuda = f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, driver {driver_version()}"
        else:
            device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
            cuda = ""
        versions = []
        for package in LIBRARIES:
            try:
                versions.append(f"{package} {importlib.metadata.version(package)}")
            except importlib.metadata.PackageNotFoundError:
                versions.append(f"{package} -")
        try:
            sage = importlib.metadata.version("sageattention")
        except importlib.metadata.PackageNotFoundError:
            sage = None
        if unknown:
            unavailable = {**unavailable, **{name: ["not a registered backend name"] for name in unknown}}
        return {
            "device": device,
            "software": f"torch {torch.__version__}{cuda}, Python {platform.python_version()}",
            "libraries": ", ".join(versions),
            "unavailable": unavailable,
            "sage_version": sage,
            "models_note": self.model_runner().note() if self.config["models"] else "",
            "gqa_flag": self.gqa_flag(),
        }

    def gqa_flag(self) -> str:
        try:
            from _gpu_check_kernels import gqa_flag_fact, short_error

            return gqa_flag_fact(self.device)
        except Exception as exc:  # a fact, not a step: its failure is its text
            return short_error(exc)

    def model_runner(self) -> Any:
        if self.models is None:
            from _gpu_check_models import Models

            smoke = self.device.type == "cpu"
            dtype = None if smoke else self.torch.bfloat16
            self.models = Models(
                self.device, dtype, steps=1 if smoke else 2, tokens=4 if smoke else 8, repeat=1 if smoke else 2
            )
        return self.models

    # ----- the steps ---------------------------------------------------------------------------------------------

    def run(self) -> int:
        from _gpu_check_report import phase_of

        skip = set(self.config["skip"])
        deadlines = self.config["deadlines"]
        for step in self.plan:
            if step in skip:
                continue
            phase = phase_of(step)
            if time.time() > deadlines[phase]:
                record = {"status": f"skipped: the time budget of the {phase} phase was used up"}
                self.done(step, record)
                continue
            backend = step.split("/", 2)[2] if step.startswith(("kernel/", "model/")) else ""
            if backend in self.config["quarantine"]:
                self.done(step, {"status": f"skipped: {backend} crashed or hung its worker earlier in this run"})
                continue
            self.emit(event="start", step=step)
            fault = self.config["faults"].get(step)
            if fault == "crash":
                os.abort()
            if fault == "hang":
                time.sleep(3600)
            try:
                if fault == "raise":
                    raise RuntimeError("fault injected by --fault")
                record = self.step(step)
            except Exception as exc:  # one step failing must not stop the others: it is a row
                from _gpu_check_kernels import short_error

                traceback.print_exc(file=sys.stderr)
                record = {"status": short_error(exc)}
                if step.startswith("kernel/"):
                    record["backend"] = step.split("/", 2)[2]
                self.done(step, record)
                if self.context_broken(exc):
                    print("gpu_check worker: the CUDA context is broken; a fresh worker takes over", file=sys.stderr)
                    return RESTART
                continue
            self.done(step, record)
        return 0

    def done(self, step: str, record: dict[str, Any]) -> None:
        self.records[step] = record
        self.emit(event="done", step=step, record=record)
        text = record.get("status") or ""
        if step.startswith("auto/"):
            timed = f", {record['auto_ms']:.3f} ms vs {record['fastest_ms']:.3f} ms" if record.get("auto_ms") else ""
            text = f"picks {record.get('pick')}{timed}" + (f" ({text})" if text else "")
        elif record.get("routed_ms"):
            direct = f", direct {record['direct_ms']:.3f} ms" if record.get("direct_ms") else ""
            text += f"; routed {record['routed_ms']:.3f} ms{direct}"
        with contextlib.suppress(OSError):  # a closed pipe: nobody reads the progress lines, the events file counts
            print(f"  {step:52} {text[:140]}", flush=True)

    def context_broken(self, exc: Exception) -> bool:
        if self.device.type != "cuda":
            return False
        if any(text in str(exc) for text in BROKEN_CONTEXT):
            return True
        try:
            self.torch.cuda.synchronize(self.device)
        except Exception:
            return True
        return False

    def step(self, step: str) -> dict[str, Any]:
        kind, _, rest = step.partition("/")
        if kind == "model":
            model, backend = rest.split("/", 1)
            return self.model_runner().record(model, backend)
        import _gpu_check_kernels as kernels
        from _gpu_check_report import ALL_SHAPES, fastest_exact, kernel_step

        shape = ALL_SHAPES[rest.split("/", 1)[0]]
        inputs = self.inputs_for(shape)
        seconds = self.config["seconds"]
        if kind == "auto":
            rows = [r for s, r in self.records.items() if s.startswith(kernel_step(shape.key, ""))]
            fastest = fastest_exact(rows)
            return kernels.auto_record(inputs, fastest["backend"] if fastest else None, seconds)
        try:
            return kernels.kernel_record(rest.split("/", 1)[1], inputs, seconds)
        finally:
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()

    def inputs_for(self, shape: Any) -> Any:
        import _gpu_check_kernels as kernels

        if self.inputs is None or self.inputs.shape != shape:
            self.inputs = None
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()
            self.inputs = kernels.Inputs(shape, self.device)
        return self.inputs


def driver_version() -> str:
    if shutil.which("nvidia-smi") is None:
        return "?"
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        return result.stdout.strip().splitlines()[0] if result.stdout.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def watch_parent() -> None:
    """Exit when the supervisor is gone: the worker has its own session, so nothing else would end it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main(config_path: str) -> int:
    faulthandler.enable()  # a segfault in a kernel library prints the Python stack before the worker dies
    watch_parent()
    config = json.loads(Path(config_path).read_text())
    with open(config["events"], "a", encoding="utf-8") as events:
        worker = Worker(config, events)
        worker.setup()
        import torch

        with torch.no_grad():
            return worker.run()
