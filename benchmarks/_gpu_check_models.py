"""benchmarks/gpu_check.py, part 3 of 4: tiny diffusers and transformers models end to end, patched vs unpatched.

The models are attnpatch.testing.tiny's (real classes, random weights, offline), run through the demo's workloads
(attnpatch.cli.demo.workloads): the Flux pipeline (diffusers' dispatcher path, T5 and CLIP text encoders) and
Llama greedy generation on a left-padded batch (transformers' attention functions, key-padding masks). Each
backend is applied with ``attnpatch.apply(model, backend=name)``, run, and removed with ``attnpatch.unapply``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from typing import Any

import torch
from _gpu_check_report import UNAPPLIED, UNPATCHED

import attnpatch
from attnpatch.core import dispatch, hooks


class Models:
    """Builds each model once per worker, with its unpatched output (the baseline every backend is compared with)."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None, steps: int, tokens: int, repeat: int) -> None:
        self.device, self.dtype, self.repeat = device, dtype, repeat
        self.steps, self.tokens = steps, tokens
        self.built: dict[str, tuple[Any, Any, Any, float, float]] = {}  # name -> job, model, baseline, ms, repeat diff

    def missing(self) -> list[str]:
        from attnpatch.testing import tiny

        return tiny.missing()

    def note(self) -> str:
        dtype = str(self.dtype or torch.float32).replace("torch.", "")
        return (
            f"Tiny models (attnpatch.testing.tiny) on {self.device.type} in {dtype}: diffusion {self.steps} step(s) "
            f"at 32x32, Llama greedy {self.tokens} tokens on a left-padded batch; ms = best of {self.repeat} run(s) "
            "after the counted one."
        )

    def _build(self, name: str) -> tuple[Any, Any, Any, float, float]:
        if name not in self.built:
            from attnpatch.cli import demo

            job = demo.workloads(self.steps, self.tokens, self.device, self.dtype)[name]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = job.build()
            baseline = job.run(model)
            began = time.perf_counter()
            again = job.run(model)
            ms = self._since(began)
            self.built[name] = (job, model, baseline, ms, _finite(job.compare(again, baseline)[0]))
        return self.built[name]

    def _since(self, began: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - began) * 1e3

    def record(self, name: str, backend: str) -> dict[str, Any]:
        missing = self.missing()
        if missing:
            return {"status": "skipped: " + "; ".join(missing)}
        job, model, baseline, ms, repeat_diff = self._build(name)
        if backend == UNPATCHED:
            note = (
                "a second unpatched run: identical"
                if repeat_diff == 0
                else f"a second unpatched run differs by {repeat_diff:.2e}"
            )
            return {"status": "ok", "ms": ms, "max_diff": 0.0, "note": note}
        if backend == UNAPPLIED:
            diff, note = job.compare(job.run(model), baseline)
            diff = _finite(diff)
            restored = diff <= repeat_diff
            status = "ok" if restored else "WRONG: the model computes something else after unapply"
            return {"status": status, "max_diff": diff, "note": note}
        return self._patched(job, model, baseline, backend)

    def _patched(self, job: Any, model: Any, baseline: Any, backend: str) -> dict[str, Any]:
        served: Counter[str] = Counter()
        fallbacks: Counter[str] = Counter()

        def observe(record: hooks.CallRecord) -> None:
            served[record.served] += 1
            for refused, reasons in record.refused.items():
                for reason in reasons:
                    fallbacks[f"{refused}: {reason}"] += 1

        times = []
        # Fallback warnings repeat what the row's fallbacks show; keep the log to the results.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attnpatch.apply(model, backend=backend)
            try:
                hooks.add_observer(observe)
                try:
                    output = job.run(model)  # counted; the first run of a backend also compiles and caches
                finally:
                    hooks.remove_observer(observe)
                for _ in range(self.repeat):
                    began = time.perf_counter()
                    job.run(model)
                    times.append(self._since(began))
            finally:
                attnpatch.unapply(model)
                dispatch.reset_fallbacks()
        diff, note = job.compare(output, baseline)
        record: dict[str, Any] = {
            "calls": sum(served.values()),
            "served": dict(served),
            "fallbacks": dict(fallbacks),
            "ms": min(times) if times else None,
            "max_diff": diff if math.isfinite(diff) else None,
            "note": note,
        }
        if not math.isfinite(diff):
            record["status"] = "WRONG: NaN or inf in the output"
        elif not served:
            record["status"] = "WRONG: no attention call was routed"
        else:
            record["status"] = "ok"
        return record


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf
