"""Sliding windows served as masks by the kernels that take masks but no window (xFormers, Ascend NPU), against the
float64 reference of tests/core/test_extra_args.py through the fakes (kernel_setup.py). A window is top-left
aligned like SDPA's causal mask, so cross-attention (seq_q != seq_kv) is served too. Tolerance: the backend's own.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from kernel_setup import qkv

from attnpatch.core import dispatch, registry
from tests.core.test_extra_args import reference

DEVICES = {"xformers": ("cuda", (8, 0)), "_native_npu": ("npu", (9, 0))}


@pytest.mark.parametrize("backend", list(DEVICES))
@pytest.mark.parametrize(
    ("seq_q", "seq_kv", "window", "causal", "padded"),
    [(33, 33, (4, 2), False, False), (9, 77, (5, 3), False, True), (13, 13, (3, -1), True, True)],
    ids=["self", "cross_77_left_pad", "causal_left_pad"],
)
def test_window_as_mask_matches_float64(
    fake_libraries: Any, pretend: Any, strict: None, backend: str, seq_q: int, seq_kv: int, window, causal, padded
) -> None:
    pretend(*DEVICES[backend])
    q, k, v = qkv(seq_q=seq_q, seq_kv=seq_kv, heads=4, heads_kv=4, seed=7)
    mask = None
    if padded:
        mask = torch.ones(2, seq_kv, dtype=torch.bool)
        mask[0, : seq_kv // 3] = False
    out = dispatch.dispatch_attention(q, k, v, mask, is_causal=causal, backend=backend, window=window)
    want, _ = reference(q, k, v, mask, causal, None, None, window)
    atol, rtol = registry.get_backend(backend).caps.tolerance_for(q.dtype)
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)


def test_softcap_sinks_and_lse_are_refused_by_mask_only_kernels(fake_libraries: Any, pretend: Any) -> None:
    pretend("cuda", (8, 0))
    q, k, v = qkv()
    with pytest.warns(Warning, match=r"has no logit soft-capping \(softcap=\.\.\.\)"):
        dispatch.dispatch_attention(q, k, v, backend="xformers", softcap=1.0)
