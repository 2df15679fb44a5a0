"""attnpatch's ``sage`` and ``sage_varlen`` backends on sageattention 1.0.x's real Triton kernels (on CPU).

The contract: a call the kernel gets wrong (test_sage_library.py: non-causal with a key count, or a varlen
sequence length, that is not a multiple of 64) is refused, naming the installed version and the fix
(sageattention >= 2.2.0); a call it gets right is served, within SageAttention's tolerance of a float64
reference, and the caller's key is left as it was. Strict mode, so a refusal cannot hide behind a fallback.

How CPU tensors reach a GPU backend: ``attnpatch.testing.emulate_device("cuda", capability)`` makes the dispatcher
count them as CUDA tensors on a GPU of that capability; the library's ``assert q.is_cuda`` is lifted in the worker
(sage_worker.py). Everything else, attnpatch's checks and adapters and the library, runs for real.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from sage_cases import Case, describe, run_alone, run_worker

SERVED, REFUSED, REFUSED_OTHER, EITHER = "served", "refused", "refused for another reason", "served or refused"

# (case, expected). Capability 8.6 unless named: the GPUs where even 2.x's sageattn runs the Triton kernel.
CASES = [
    (Case("sage", 64, 64), SERVED),
    (Case("sage", 64, 65), REFUSED),
    (Case("sage", 64, 77), REFUSED),
    (Case("sage", 64, 128, head_dim=128), SERVED),
    (Case("sage", 64, 100, head_dim=128), REFUSED),
    (Case("sage", 64, 64, head_dim=96), SERVED),
    (Case("sage", 64, 77, head_dim=96), REFUSED),
    (Case("sage", 65, 65, causal=True), SERVED),
    (Case("sage", 77, 77, causal=True), SERVED),
    (Case("sage", 100, 100, causal=True, head_dim=128), SERVED),
    (Case("sage", 64, 77, heads_q=4, heads_kv=2), REFUSED),
    (Case("sage", 64, 128, heads_q=4, heads_kv=2), SERVED),
    (Case("sage", 77, 77, causal=True, heads_q=4, heads_kv=2), SERVED),
    (Case("sage", 64, 128, scale=0.3), SERVED),
    (Case("sage", 77, 77, causal=True, scale=0.3), SERVED),
    (Case("sage", 64, 77, scale=0.3), REFUSED),
    (Case("sage", 64, 77, dtype="bfloat16"), REFUSED),
    (Case("sage", 77, 77, causal=True, dtype="bfloat16"), SERVED),
    (Case("sage", 64, 77, capability=(9, 0)), REFUSED),  # 1.x has only Triton kernels, on every GPU
    (Case("sage", 64, 64, capability=(9, 0)), SERVED),
    (Case("sage", 64, 64, head_dim=80), REFUSED_OTHER),  # 1.x sageattn asserts head_dim in (64, 96, 128)
    (Case("sage", 64, 128, causal=True), REFUSED_OTHER),  # causal only with seq_q == seq_kv
    (Case("sage_varlen", 64, 64, batch=2), SERVED),
    (Case("sage_varlen", 64, 77, batch=2), REFUSED),
    (Case("sage_varlen", 77, 77, batch=2, causal=True), SERVED),
    (Case("sage_varlen", 64, 100, batch=2, kv_lengths=(100, 37)), REFUSED),
    (Case("sage_varlen", 64, 100, batch=2, kv_lengths=(100, 37), head_dim=128), REFUSED),
    (Case("sage_varlen", 64, 77, batch=2, kv_lengths=(77, 77)), REFUSED),
    (Case("sage_varlen", 64, 128, batch=2, kv_lengths=(64, 100)), REFUSED),
    # Every sequence a multiple of 64: the kernel is right, but the lengths live in the mask, which the checks
    # cannot read without a device sync. Served (and then right) or refused with the version reason.
    (Case("sage_varlen", 64, 128, batch=2, kv_lengths=(128, 64)), EITHER),
    (Case("sage_varlen", 77, 77, batch=2, kv_lengths=(64, 64)), EITHER),
    (Case("sage_varlen", 64, 64, batch=2, head_dim=96), REFUSED_OTHER),  # 1.x varlen asserts head_dim in (64, 128)
]


@pytest.fixture(scope="module")
def answer() -> dict[str, Any]:
    return run_worker([case for case, _ in CASES])


def result_of(answer: dict[str, Any], case: Case) -> dict[str, Any]:
    return answer["results"][[c for c, _ in CASES].index(case)]


def version_reason(message: str, version: str) -> bool:
    """Whether a refusal names the installed release and the release that fixed the tail block."""
    return version in message and re.search(r"sageattention\s*>=\s*2\.2\.0", message) is not None


def test_expectations_follow_the_measured_rule() -> None:
    # The table above must agree with what test_sage_library.py measures of the kernel itself.
    for case, expected in CASES:
        if expected in (SERVED, REFUSED):
            assert (expected == SERVED) == case.kernel_right, case
        if expected == EITHER:
            assert case.kernel_right, case


@pytest.mark.parametrize(("case", "expected"), CASES, ids=[str(c) for c, _ in CASES])
def test_sage_backends(case: Case, expected: str, answer: dict[str, Any]) -> None:
    result, version = result_of(answer, case), answer["sageattention"]
    assert result["outcome"] != "raised", describe(case, result) + "\n" + result.get("traceback", "")
    if expected == EITHER and result["outcome"] == "refused":
        expected = REFUSED
    if expected == REFUSED_OTHER:
        assert result["outcome"] == "refused", describe(case, result)
        assert not version_reason(result["message"], version), describe(case, result)
    elif expected == REFUSED:
        assert result["outcome"] == "refused", describe(case, result)
        assert version_reason(result["message"], version), describe(case, result)
    else:
        assert result["outcome"] == "served", describe(case, result)
        assert result["finite"] and result["max_abs_error"] <= case.atol, describe(case, result)
        assert not result["key_mutated"], describe(case, result)


@pytest.mark.parametrize("seq", [1024, 1088], ids=["below-2**31", "past-2**31"])
def test_int32_offsets(seq: int) -> None:
    # q, k and v viewed with seq stride 2**21 (test_sage_library.py: past 2**31 the kernels crash or read the
    # wrong memory). Their contiguous copies are small, so serving them right is possible; a refusal must say why.
    # Never a crash, never an answer that differs from the same call on contiguous tensors.
    case = Case("sage", seq, seq, seq_stride=2**21)
    result = run_alone(case)
    if result["outcome"] == "refused" and seq > 1024:
        assert re.search(r"int32|2\*\*31", result["message"]), describe(case, result)
    else:
        assert result["outcome"] == "served", describe(case, result)
        assert result["max_abs_error"] <= case.atol, describe(case, result)
        assert result["max_diff_vs_contiguous"] == 0, describe(case, result)
