"""Cases, tolerance and the worker call shared by the SageAttention real-kernel tests.

Imports only the standard library: it is imported while the main suite collects, where triton may be missing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("sage_worker.py")
REPO = Path(__file__).resolve().parents[2]

# SageAttention's Triton attention kernels walk the keys in blocks of BLOCK_N = 64 (attn_qk_int8_per_block.py).
KEY_BLOCK = 64


def sage_atol(head_dim: int, scale: float | None) -> float:
    """Largest |out - ref| (float64 reference) of a correct SageAttention INT8 result, fp16 or bf16 inputs.

    Quantising Q and K to int8 perturbs each score in proportion to the score's size, so the error grows with
    the softmax temperature ``scale * sqrt(head_dim)`` (1 at the default scale). Measured over ~2,500 calls of
    sageattention 1.0.6 (seq 64-200, head_dim 64/96/128, scale 0.05-0.5, GQA, varlen, causal or not; see
    docs/kernel-truth.md): correct results stay within 0.074 * max(1, temperature), the tail-block bug's results
    at the default scale exceed 0.083. 0.08 passes the first with a margin and catches the second.
    """
    temperature = (head_dim**-0.5 if scale is None else scale) * math.sqrt(head_dim)
    return 0.08 * max(1.0, temperature)


@dataclass(frozen=True)
class Case:
    """One attention call: q (batch, seq_q, heads_q, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""

    target: str  # "sageattn" / "sageattn_varlen" (the library) or "sage" / "sage_varlen" (attnpatch backends)
    seq_q: int
    seq_kv: int
    head_dim: int = 64
    causal: bool = False
    scale: float | None = None
    heads_q: int = 2
    heads_kv: int = 2
    batch: int = 1
    kv_lengths: tuple[int, ...] | None = None  # per-sequence key lengths (varlen: a key-padding mask)
    dtype: str = "float16"
    capability: tuple[int, int] = (8, 6)
    seed: int = 0
    seq_stride: int | None = None  # q, k, v as views with this seq stride (issue 386's int32 offsets)

    def __str__(self) -> str:
        parts = [self.target, f"{self.seq_q}x{self.seq_kv}", f"d{self.head_dim}"]
        if self.kv_lengths is not None:
            parts.append("len" + "+".join(map(str, self.kv_lengths)))
        parts += ["causal"] if self.causal else []
        parts += [f"scale{self.scale}"] if self.scale is not None else []
        parts += [f"gqa{self.heads_q}to{self.heads_kv}"] if self.heads_q != self.heads_kv else []
        parts += [self.dtype] if self.dtype != "float16" else []
        parts += [f"sm{self.capability[0]}{self.capability[1]}"] if self.capability != (8, 6) else []
        parts += [f"stride{self.seq_stride}"] if self.seq_stride is not None else []
        return "-".join(parts)

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.kv_lengths if self.kv_lengths is not None else (self.seq_kv,) * self.batch

    @property
    def kernel_right(self) -> bool:
        """Whether a Triton kernel before sageattention 2.2.0 computes this call right (measured, see docs).

        Causal calls (seq_q == seq_kv) are right: the causal mask hides the last block's missing keys. Non-causal
        calls are right only when every sequence's key count is a multiple of the key block.
        """
        return self.causal or all(length % KEY_BLOCK == 0 for length in self.lengths)

    @property
    def atol(self) -> float:
        return sage_atol(self.head_dim, self.scale)

    def worker_case(self) -> dict[str, Any]:
        fields = asdict(self)
        target = fields.pop("target")
        if target.startswith("sageattn"):
            fields.update(kind="direct", function=target)
        else:
            fields.update(kind="attnpatch", backend=target)
        return {**fields, "atol": self.atol, "rtol": 0.0}


def _worker(cases: list[Case]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        # The worker imports attnpatch: this checkout's, whatever else is installed.
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    return subprocess.run(
        [sys.executable, str(WORKER)],
        input=json.dumps([case.worker_case() for case in cases]),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )


def run_worker(cases: list[Case]) -> dict[str, Any]:
    """Run ``cases`` in one sage_worker.py process; returns its JSON answer (results in the order of ``cases``)."""
    done = _worker(cases)
    if done.returncode != 0:
        raise RuntimeError(f"sage_worker.py exited {done.returncode}:\n{done.stderr[-4000:]}")
    answer: dict[str, Any] = json.loads(done.stdout)
    if len(answer["results"]) != len(cases):
        raise RuntimeError(f"sage_worker.py answered {len(answer['results'])} cases of {len(cases)}")
    return answer


def run_alone(case: Case) -> dict[str, Any]:
    """``case``'s result from a worker of its own: outcome "crashed" when the kernel takes the process down."""
    done = _worker([case])
    if done.returncode != 0:
        return {"outcome": "crashed", "message": f"worker exited {done.returncode}: {done.stderr[-400:]}"}
    result: dict[str, Any] = json.loads(done.stdout)["results"][0]
    return result


def describe(case: Case, result: dict[str, Any]) -> str:
    """One line for an assertion message: the case and what the kernel did."""
    shown = {key: result.get(key) for key in ("outcome", "max_abs_error", "gain", "message") if key in result}
    return f"{case} (atol {case.atol:.3f}): {shown}"
