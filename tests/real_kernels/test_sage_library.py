"""sageattention 1.0.x itself, its real Triton kernels run by Triton's interpreter on CPU: what it gets wrong.

These tests pin the library's behaviour, not attnpatch's: ``sageattn`` and ``sageattn_varlen`` are called
directly (see sage_worker.py for how, and the one line lifted) and compared with torch's SDPA in float64.

The finding they pin: the Triton attention kernels of every release before 2.2.0 load the last block of 64 keys
with a mask (masked keys read as 0 here, undefined on a GPU) but never mask the scores, so those missing keys
still enter the softmax sum. A non-causal call whose key count is not a multiple of 64 returns outputs scaled
down by 14-47% (``gain`` below). Causal calls (seq_q == seq_kv) are right: their causal mask also hides the
missing keys. Upstream fixed it in commit 3917283 ("fix mask computation for better precision", first released
in 2.2.0). If one of the "wrong" cases here starts passing, the pinned release has changed: update the version
rule in attnpatch/backends/sage.py and docs/kernel-truth.md with it.
"""

from __future__ import annotations

from typing import Any

import pytest
from sage_cases import Case, describe, run_alone, run_worker

# A seq stride (a view into a fused QKV buffer has 3 * heads * head_dim) that takes (seq - 1) * stride past 2**31
# elements between 1024 and 1088 tokens, both multiples of 64.
SEQ_STRIDE = 2**21

WRONG_GAIN = 0.9  # the bug's outputs are 0.53-0.86 of the right ones at these shapes; correct ones 0.994-1.003

CASES = [
    Case("sageattn", 64, 64),
    Case("sageattn", 64, 65),
    Case("sageattn", 64, 77),
    Case("sageattn", 64, 100),
    Case("sageattn", 64, 128),
    Case("sageattn", 128, 65, head_dim=96),
    Case("sageattn", 64, 64, head_dim=96),
    Case("sageattn", 64, 77, head_dim=96),
    Case("sageattn", 64, 128, head_dim=128),
    Case("sageattn", 64, 100, head_dim=128),
    Case("sageattn", 65, 65, causal=True),
    Case("sageattn", 77, 77, causal=True),
    Case("sageattn", 100, 100, causal=True, head_dim=128),
    Case("sageattn", 130, 130, causal=True, head_dim=96),
    Case("sageattn", 128, 128, causal=True),
    Case("sageattn", 64, 77, heads_q=4, heads_kv=2),
    Case("sageattn", 64, 128, heads_q=4, heads_kv=2),
    Case("sageattn", 77, 77, causal=True, heads_q=4, heads_kv=2),
    Case("sageattn", 64, 128, scale=0.3),
    Case("sageattn", 77, 77, causal=True, scale=0.3),
    Case("sageattn", 64, 77, scale=0.05),
    Case("sageattn", 64, 77, dtype="bfloat16"),
    Case("sageattn", 77, 77, causal=True, dtype="bfloat16"),
    Case("sageattn_varlen", 64, 128, batch=2, kv_lengths=(128, 64)),
    Case("sageattn_varlen", 77, 64, batch=2, kv_lengths=(64, 64)),
    Case("sageattn_varlen", 64, 100, batch=2, kv_lengths=(100, 37)),
    Case("sageattn_varlen", 64, 100, batch=2, kv_lengths=(100, 37), head_dim=128),
    Case("sageattn_varlen", 77, 77, batch=2),
    Case("sageattn_varlen", 77, 77, batch=2, causal=True),
    Case("sageattn_varlen", 130, 130, batch=2, causal=True, head_dim=128),
]

# What 1.0.x refuses by itself (core.py asserts), for attnpatch's head-dim reasons.
REFUSED = [
    (Case("sageattn", 64, 64, head_dim=80), "headdim should be in [64, 96, 128]"),
    (Case("sageattn_varlen", 64, 64, head_dim=96), "varlen only support head_dim [64, 128]"),
]


@pytest.fixture(scope="module")
def answer() -> dict[str, Any]:
    return run_worker(CASES + [case for case, _ in REFUSED])


def result_of(answer: dict[str, Any], case: Case) -> dict[str, Any]:
    return answer["results"][(CASES + [c for c, _ in REFUSED]).index(case)]


def test_the_release_under_test(answer: dict[str, Any]) -> None:
    assert answer["sageattention"].startswith("1.0."), answer


@pytest.mark.parametrize("case", [c for c in CASES if c.kernel_right], ids=str)
def test_right(case: Case, answer: dict[str, Any]) -> None:
    result = result_of(answer, case)
    assert result["outcome"] == "served", describe(case, result)
    assert result["finite"] and result["max_abs_error"] <= case.atol, describe(case, result)
    assert abs(result["gain"] - 1) < 0.01, describe(case, result)


@pytest.mark.parametrize("case", [c for c in CASES if not c.kernel_right], ids=str)
def test_wrong_when_the_last_key_block_is_partial(case: Case, answer: dict[str, Any]) -> None:
    result = result_of(answer, case)
    assert result["outcome"] == "served", describe(case, result)
    assert result["max_abs_error"] > case.atol, describe(case, result)
    assert result["gain"] < WRONG_GAIN, describe(case, result)  # too small, not noisy


@pytest.mark.parametrize(("case", "assertion"), REFUSED, ids=[str(c) for c, _ in REFUSED])
def test_head_dims_1x_refuses(case: Case, assertion: str, answer: dict[str, Any]) -> None:
    result = result_of(answer, case)
    assert result["outcome"] == "raised" and assertion in result["message"], describe(case, result)


def test_key_is_changed_in_place(answer: dict[str, Any]) -> None:
    # sageattn and sageattn_varlen smooth K with `k -= km` on the caller's tensor: why attnpatch passes a copy.
    for case in (CASES[0], CASES[-1]):
        assert result_of(answer, case)["key_mutated"], describe(case, result_of(answer, case))


def test_int32_offsets_below_2_31_are_right() -> None:
    case = Case("sageattn", 64, 1024, seq_stride=SEQ_STRIDE)  # largest key offset 1023 * 2**21 + 63 < 2**31
    result = run_alone(case)
    assert result["outcome"] == "served" and result["max_abs_error"] <= case.atol, describe(case, result)
    assert result["max_diff_vs_contiguous"] == 0, describe(case, result)


def test_int32_offsets_past_2_31_crash_or_corrupt() -> None:
    # Upstream issue 386: `offs_n[:, None] * stride` (and, in the quantisation kernel, `program_id * stride` for
    # batch and head) is int32 arithmetic; past 2**31 it wraps and the kernel reads the wrong memory. Under the
    # interpreter that is a segfault or other memory read as keys, whichever the wrapped address hits; on a GPU a
    # wrong answer or an illegal memory access.
    case = Case("sageattn", 64, 1088, seq_stride=SEQ_STRIDE)  # 1087 * 2**21 >= 2**31
    result = run_alone(case)
    assert result["outcome"] == "crashed" or result["max_diff_vs_contiguous"] > 0, describe(case, result)
