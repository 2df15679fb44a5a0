"""GPU check of every attention backend that can run here: correctness against float64, timings, tiny models.

    python benchmarks/gpu_check.py --quick                # the 15-minute GPU window: ~4-5 min, hard stop at 7
    python benchmarks/gpu_check.py                        # every shape (adds SDXL and Wan 2.1), hard stop at 9 min
    python benchmarks/gpu_check.py --quick --shapes flux,clip77_bf16 --backends native,sage --models none
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke.md   # tiny shapes on CPU: tests this script

What it does, on one CUDA GPU (docs/gpu.md says how to run it in an offline window and what to carry):

- correctness: for each shape (77 CLIP keys in fp16 and bf16, lengths that are no multiple of 64, GQA, causal,
  then the timed shapes) and each backend available here, sampled query rows of the routed output against a
  float64 reference, within the backend's declared tolerance; a backend that refuses a call is a row with its
  reasons (SageAttention before 2.2.0 must refuse 77 non-causal keys: the report checks that rule, and runs the
  library's own call there to show why);
- timings at Flux 1024px, SD 1.5 (self and cross) and Llama prefill: TFLOP/s per backend, and the routed call
  (``attnpatch.dispatch_attention``) against the direct library call, interleaved; which backend ``auto`` picks;
- end to end: a tiny Flux pipeline and a tiny Llama (``attnpatch.testing.tiny``, on cuda in bf16) under
  ``attnpatch.apply(model, backend=name)`` for every backend, against the unpatched run, then ``unapply``.

Every step runs in a worker process. The supervisor (this file's main) writes the report after each step, kills
a step that hangs (--step-timeout), starts a new worker after a crash, and stops at --budget whatever happens:
each failure is a row, never the end of the run. Writes docs/gpu-results.md (--out overrides). Without a GPU
it prints that nothing was measured and exits 0. Needs torch; the models need diffusers and transformers.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # attnpatch from this checkout, installed or not

from _gpu_check_report import ALL_SHAPES, CPU_SHAPES, FULL_SHAPES, QUICK_SHAPES, failure, render  # noqa: E402

MODES = {  # shapes, models, --budget seconds, --step-timeout seconds
    "quick": (QUICK_SHAPES, "flux,llama", 420.0, 150.0),
    "full": (FULL_SHAPES, "flux,llama", 540.0, 150.0),
    "cpu-smoke": (CPU_SHAPES, "flux,llama", 240.0, 120.0),
}
# Each phase may start steps until this share of the budget has passed (time a phase leaves rolls over).
PHASE_SHARES = {"correctness": 0.4, "timing": 0.75, "models": 0.97}
MAX_WORKERS = 16
# A backend whose steps crashed or hung its worker this often has its remaining steps skipped: a library that
# segfaults at import would otherwise cost a worker start (~10 s) at every shape, a hang --step-timeout each time.
STRIKES = {"crashed": 1.0, "timed out": 2.0, "CUDA error": 1.0}
QUARANTINE_AT = 2.0
POLL_SECONDS = 0.1
RESTART = 75  # a worker's exit status after a CUDA error that left its context unusable (_gpu_check_worker.py)


class Supervisor:
    """Runs workers until every step of the plan has a record, the budget is spent, or workers cannot start."""

    def __init__(self, opts: argparse.Namespace, mode: str, shapes: list[str], models: list[str]) -> None:
        self.opts, self.mode, self.shapes, self.models = opts, mode, shapes, models
        self.started = time.time()
        self.deadline = self.started + opts.budget
        self.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.command = " ".join(["python", "benchmarks/gpu_check.py", *(opts.argv or [])])
        self.env: dict[str, Any] | None = None
        self.plan: list[str] | None = None
        self.records: dict[str, dict[str, Any]] = {}
        self.events: list[str] = []
        self.incomplete = ""
        self.workers = 0
        self.strikes: collections.Counter[str] = collections.Counter()
        self.last_done = ""
        self.child: subprocess.Popen[str] | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    def state(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "command": self.command,
            "elapsed": time.time() - self.started,
            "budget": self.opts.budget,
            "workers": self.workers,
            "env": self.env,
            "plan": self.plan or [],
            "shapes": self.shapes,
            "records": self.records,
            "events": self.events,
            "incomplete": self.incomplete,
        }

    def write(self) -> None:
        if self.opts.out is None:
            return
        text = render(self.state())
        self.opts.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.opts.out.with_name(self.opts.out.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(self.opts.out)  # atomic: a kill never leaves half a report

    def run(self) -> str:
        idle_starts = 0
        while True:
            remaining = None if self.plan is None else [s for s in self.plan if s not in self.records]
            if remaining == []:
                break
            if time.time() >= self.deadline:
                self.incomplete = f"the time budget (--budget {self.opts.budget:.0f} s) ran out"
                break
            if idle_starts >= 2 or self.workers >= MAX_WORKERS:
                self.incomplete = f"stopped after {self.workers} worker(s): {self.events[-1] if self.events else ''}"
                break
            try:
                idle_starts = 0 if self.run_worker() else idle_starts + 1
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see main): keep what was measured
                if self.child is not None:
                    _kill(self.child)
                self.incomplete = "interrupted (SIGINT or SIGTERM)"
                break
        if self.incomplete:
            self.events.append(f"INCOMPLETE: {self.incomplete}")
        self.write()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return render(self.state())

    def run_worker(self) -> int:
        """One worker, until it exits or is killed; returns how many steps got a record."""
        self.workers += 1
        number = self.workers
        events_path = self.tmp / f"events-{number}.jsonl"
        config_path = self.tmp / f"config-{number}.json"
        phases = {name: self.started + share * self.opts.budget for name, share in PHASE_SHARES.items()}
        config = {
            "events": str(events_path),
            "plan": self.plan,
            "skip": list(self.records),
            "records": {s: r for s, r in self.records.items() if s.startswith("kernel/")},
            "deadlines": phases,
            "cpu_smoke": self.mode == "cpu-smoke",
            "shapes": self.shapes,
            "backends": self.opts.backends.split(",") if self.opts.backends else [],
            "models": self.models,
            "seconds": self.opts.seconds,
            "faults": dict(f.split("=", 1) for f in self.opts.fault or []),
            "quarantine": [b for b, n in self.strikes.items() if n >= QUARANTINE_AT],
        }
        config_path.write_text(json.dumps(config))
        events_path.touch()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("HF_HUB_OFFLINE", "1")  # Hub backends must fail at once, not after 25 s of retries
        child = self.child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(config_path)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: a kill takes its compile workers along
        )
        tail: collections.deque[str] = collections.deque(maxlen=60)
        reader = threading.Thread(target=_echo, args=(child.stderr, tail), daemon=True)
        reader.start()
        before = len(self.records)
        self.last_done = ""
        current: str | None = None
        since = time.time()
        offset, buffered = 0, ""
        outcome = ""
        while True:
            exited = child.poll() is not None
            with open(events_path, encoding="utf-8") as handle:
                handle.seek(offset)
                chunk = handle.read()
                offset = handle.tell()
            buffered += chunk
            *lines, buffered = buffered.split("\n")
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                current, since = self.handle(event, current, since)
            if exited:
                break
            now = time.time()
            if now - since > self.opts.step_timeout:  # in a step, or in the worker's setup (CUDA init, imports)
                where = "" if current is not None else " before its first step"
                outcome = f"timed out after {self.opts.step_timeout:.0f} s (--step-timeout){where}: worker killed"
            elif now >= self.deadline:
                outcome = f"stopped: the time budget (--budget {self.opts.budget:.0f} s) ran out during this step"
            if outcome:
                _kill(child)
                break
            time.sleep(POLL_SECONDS)
        child.wait()
        reader.join(timeout=5)
        code = child.returncode
        if current is not None:
            status = outcome or f"crashed: {_describe_exit(code)}{_fault_line(tail)}"
            record: dict[str, Any] = {"status": status}
            if current.startswith("kernel/"):
                record["backend"] = current.split("/", 2)[2]
            self.records[current] = record
            self.strike(current, STRIKES["timed out" if outcome.startswith("timed out") else "crashed"])
            _say(f"  {current:52} {status[:110]}")
        elif code == RESTART and self.last_done:  # the worker's last step broke the CUDA context
            self.strike(self.last_done, STRIKES["CUDA error"])
        done = len(self.records) - before
        if code != 0 or outcome:
            last = _fault_line(tail) or next(
                (f" ({line.strip()[:200]})" for line in reversed(tail) if line.strip()), ""
            )
            self.events.append(f"worker {number}: {outcome or _describe_exit(code)} after {done} step(s){last}")
        self.write()
        return done

    def strike(self, step: str, weight: float) -> None:
        kind, _, rest = step.partition("/")
        if kind in ("kernel", "model"):
            self.strikes[rest.split("/", 1)[1]] += weight

    def handle(self, event: dict[str, Any], current: str | None, since: float) -> tuple[str | None, float]:
        kind = event["event"]
        if kind == "env" and self.env is None:
            self.env = event["env"]
        elif kind == "plan" and self.plan is None:
            self.plan = event["steps"]
        elif kind == "start":
            return event["step"], time.time()
        elif kind == "done":
            self.records[event["step"]] = event["record"]
            self.last_done = event["step"]
            self.write()
            return None, time.time()
        return current, since


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _say(text: str) -> None:
    with contextlib.suppress(OSError):  # a closed pipe must not stop the run: the report is the result
        print(text, flush=True)


def _echo(stream: Any, tail: collections.deque[str]) -> None:
    for line in stream:
        tail.append(line.rstrip("\n"))
        with contextlib.suppress(OSError):
            sys.stderr.write(line)


def _kill(child: subprocess.Popen[str]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)  # the worker's own process group (start_new_session)
    except (ProcessLookupError, PermissionError):
        child.kill()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == RESTART:
        return "exited after a CUDA error (context unusable)"
    return f"exited with status {code}"


def _fault_line(tail: collections.deque[str]) -> str:
    # faulthandler's dump: the innermost frame follows "(most recent call first)".
    lines = list(tail)
    for i, line in enumerate(lines):
        if "most recent call first" in line and i + 1 < len(lines):
            return f" (at {lines[i + 1].strip()[:200]})"
    first = next((line for line in lines if line.startswith("Fatal Python error")), "")
    return f" ({first[:200]})" if first else ""


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the GPU window's check: ~4-5 min, hard stop at 7 min")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes and models on CPU, to test this script")
    parser.add_argument("--out", type=Path, help="markdown report path (default: docs/gpu-results.md on a GPU)")
    parser.add_argument(
        "--shapes", help=f"comma-separated shape keys (default: the mode's); any of {', '.join(ALL_SHAPES)}"
    )
    parser.add_argument("--backends", help="comma-separated backend names (default: every available backend)")
    parser.add_argument("--models", help="tiny models end to end: flux, sd, llama, comma-separated, or none")
    parser.add_argument("--budget", type=float, help="hard limit in seconds for the whole run (quick 420, full 540)")
    parser.add_argument("--step-timeout", type=float, help="seconds one step may take before its worker is killed")
    parser.add_argument("--seconds", type=float, default=0.4, help="measurement seconds per backend and shape")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--fault", action="append", help=argparse.SUPPRESS)  # STEP=crash|hang|raise (tests)
    opts = parser.parse_args(argv)
    opts.argv = sys.argv[1:] if argv is None else argv
    if opts.quick and opts.cpu_smoke:
        parser.error("--quick and --cpu-smoke exclude each other")
    mode = "cpu-smoke" if opts.cpu_smoke else "quick" if opts.quick else "full"
    shapes, models, budget, step_timeout = MODES[mode]
    opts.mode = mode
    opts.budget = opts.budget or budget
    opts.step_timeout = opts.step_timeout or step_timeout
    keys = [s.key for s in shapes]
    if opts.shapes:
        wanted = [k.strip() for k in opts.shapes.split(",") if k.strip()]
        unknown = [k for k in wanted if k not in ALL_SHAPES]
        if unknown:
            parser.error(f"--shapes: unknown {', '.join(unknown)}; choose from {', '.join(ALL_SHAPES)}")
        keys = wanted
    opts.shape_keys = [k for k in keys if not ALL_SHAPES[k].timed] + [k for k in keys if ALL_SHAPES[k].timed]
    spec = models if opts.models is None else opts.models
    opts.model_names = [] if spec.strip() in ("", "none") else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in opts.model_names if m not in ("flux", "sd", "llama")]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from flux, sd, llama, none")
    if mode == "cpu-smoke":
        opts.seconds = min(opts.seconds, 0.05)
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if opts.worker:
        from _gpu_check_worker import main as worker_main

        return worker_main(opts.worker)
    if opts.mode != "cpu-smoke":
        import torch

        if not torch.cuda.is_available():
            print(
                "gpu_check: no CUDA GPU present (torch.cuda.is_available() is False): nothing measured. "
                "Run it on a GPU machine, or with --cpu-smoke to test the script itself."
            )
            return 0
        opts.out = opts.out or ROOT / "docs" / "gpu-results.md"
    supervisor = Supervisor(opts, opts.mode, opts.shape_keys, opts.model_names)
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` and the like: stop the worker, write the report
    models = ", ".join(opts.model_names) or "none"
    _say(f"gpu_check: {opts.mode}, {len(opts.shape_keys)} shapes, models: {models}, budget {opts.budget:.0f} s")
    text = supervisor.run()
    failed = sum(1 for r in supervisor.records.values() if failure(r.get("status", "")))
    incomplete = f"; INCOMPLETE: {supervisor.incomplete}" if supervisor.incomplete else ""
    _say(
        f"gpu_check: {len(supervisor.records)}/{len(supervisor.plan or [])} steps, {failed} failed, "
        f"{time.time() - supervisor.started:.0f} s{incomplete}"
    )
    _say(f"gpu_check: wrote {opts.out}" if opts.out is not None else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
