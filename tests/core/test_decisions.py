"""The router's decision caches (issue 13): a chain's lead on a device, decisions per call kind, and the fallback
counts they keep (tallies folded when the counts are read or the decisions dropped)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import attnpatch
from attnpatch.core import decide, dispatch, hooks, registry, selection
from attnpatch.core.call import MASK_NONE, CallSpec
from attnpatch.errors import AttnpatchWarning, UnsupportedCall
from attnpatch.testing import emulate_device


def qkv(dim: int = 16, seq: int = 6) -> torch.Tensor:
    return torch.randn(1, seq, 2, dim)


def times(factor: float):
    native = registry.get_backend("native").fn

    def fn(*args):
        return native(*args) * factor

    return fn


def served_by(out: torch.Tensor, q: torch.Tensor) -> float:
    plain = registry.get_backend("native").fn(q, q, q, None, 0.0, False, None, False)
    return round(float((out / plain).mean()), 3)


@contextlib.contextmanager
def registered(name: str, factor: float, **capabilities):
    """A backend computing native attention times ``factor`` (the output says who ran), for the block."""
    attnpatch.register_backend(name, times(factor), **capabilities)
    try:
        yield
    finally:
        attnpatch.unregister_backend(name)


def refusals(refused: str) -> int:
    return sum(n for (_, name, _, _), n in attnpatch.fallback_counts().items() if name == refused)


@pytest.fixture
def elsewhere():
    """'elsewhere' runs only on npu (refuses every CPU call for one reason); 'small' serves head dims <= 8 (x3)."""
    attnpatch.register_backend("elsewhere", times(2.0), devices={"npu"})
    attnpatch.register_backend("small", times(3.0), max_head_dim=8)
    dispatch.reset_fallbacks()
    yield
    attnpatch.unregister_backend("elsewhere")
    attnpatch.unregister_backend("small")
    dispatch.reset_fallbacks()


def test_a_chain_past_a_backend_of_another_device_leads_with_the_next(elsewhere) -> None:
    q = qkv()
    call = CallSpec.of(q, q, q, MASK_NONE, 0.0, False, None)
    chain = selection.resolve("elsewhere,native")
    found = decide.lead(chain, call, strict=False)
    assert found is not None and found[0].name == "native"
    assert found[1] == {"elsewhere": ["runs on npu, got tensors on cpu"]}
    # A member with rules (head dim) decides per call: no lead, whatever this call's head dim.
    assert decide.lead(selection.resolve("small,native"), call, strict=False) is None
    # Strict mode never skips a member.
    assert decide.lead(chain, call, strict=True) is None


def test_every_call_of_a_lead_is_counted_once_and_warned_once(elsewhere) -> None:
    q = qkv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(1, 26):
            out = attnpatch.dispatch_attention(q, q, q, backend="elsewhere,native")
            if n in (1, 2, 25):
                assert refusals("elsewhere") == n  # read mid-way: the tally is folded each time
    assert served_by(out, q) == 1.0
    assert len([w for w in caught if issubclass(w.category, AttnpatchWarning)]) == 1
    dispatch.reset_fallbacks()
    attnpatch.dispatch_attention(q, q, q, backend="elsewhere,native")
    assert refusals("elsewhere") == 1


def test_counts_survive_the_decisions_being_dropped(elsewhere) -> None:
    q = qkv()
    for _ in range(5):
        attnpatch.dispatch_attention(q, q, q, backend="elsewhere,native")
    attnpatch.register_backend("another", times(5.0))  # a registry change drops every decision
    try:
        assert refusals("elsewhere") == 5
        for _ in range(3):
            attnpatch.dispatch_attention(q, q, q, backend="elsewhere,native")
        assert refusals("elsewhere") == 8
    finally:
        attnpatch.unregister_backend("another")


def test_a_rule_decides_per_call_kind_with_no_lead(elsewhere) -> None:
    wide, narrow = qkv(dim=16), qkv(dim=8)
    for _ in range(3):
        assert served_by(attnpatch.dispatch_attention(narrow, narrow, narrow, backend="small,native"), narrow) == 3.0
        assert served_by(attnpatch.dispatch_attention(wide, wide, wide, backend="small,native"), wide) == 1.0
    assert refusals("small") == 3


def test_a_lead_is_per_device_and_emulation_drops_it(elsewhere) -> None:
    q = qkv()
    with registered("gpu_only", 4.0, devices={"cuda"}):
        for _ in range(3):
            assert served_by(attnpatch.dispatch_attention(q, q, q, backend="gpu_only,native"), q) == 1.0
        with emulate_device("cuda", capability=(9, 0)):
            for _ in range(3):
                assert served_by(attnpatch.dispatch_attention(q, q, q, backend="gpu_only,native"), q) == 4.0
        assert served_by(attnpatch.dispatch_attention(q, q, q, backend="gpu_only,native"), q) == 1.0


def test_strict_mode_refuses_every_call_not_only_the_first(elsewhere) -> None:
    q = qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttnpatchWarning)
        attnpatch.dispatch_attention(q, q, q, backend="elsewhere,native")  # a lead while not strict
    attnpatch.set_strict(True)
    for _ in range(3):
        with pytest.raises(UnsupportedCall, match="runs on npu"):
            attnpatch.dispatch_attention(q, q, q, backend="elsewhere,native")


def test_auto_leads_only_without_a_chooser_or_rules_at_the_top(elsewhere) -> None:
    q = qkv()
    call = CallSpec.of(q, q, q, MASK_NONE, 0.0, False, None)
    auto = selection.resolve("auto")
    found = decide.lead(auto, call, strict=False)
    assert found is not None and found[0].name == "native" and found[1] == {}
    # A chooser times the candidates of each kind of call (flex serves some on CPU): no lead.
    hooks.set_auto_chooser(lambda call, candidates, args: candidates[-1])
    assert decide.lead(auto, call, strict=False) is None
    hooks.set_auto_chooser(None)
    with registered("ranked", 6.0, priority=50, max_head_dim=8):
        assert decide.lead(auto, call, strict=False) is None  # the top candidate has rules
        narrow = qkv(dim=8)
        for _ in range(3):
            assert served_by(attnpatch.dispatch_attention(q, q, q, backend="auto"), q) == 1.0
            assert served_by(attnpatch.dispatch_attention(narrow, narrow, narrow, backend="auto"), narrow) == 6.0


def test_a_kernel_that_raises_after_its_lead_falls_back(elsewhere) -> None:
    state = {"raise": False}
    native = registry.get_backend("native").fn

    def flaky(*args):
        if state["raise"]:
            raise RuntimeError("kernel failed")
        return native(*args) * 7

    attnpatch.register_backend("flaky", flaky)
    try:
        q = qkv()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AttnpatchWarning)
            assert served_by(attnpatch.dispatch_attention(q, q, q, backend="elsewhere,flaky"), q) == 7.0
            assert served_by(attnpatch.dispatch_attention(q, q, q, backend="elsewhere,flaky"), q) == 7.0
            state["raise"] = True
            assert served_by(attnpatch.dispatch_attention(q, q, q, backend="elsewhere,flaky"), q) == 1.0
        assert any(
            name == "flaky" and "raised RuntimeError" in reason for (_, name, _, reason) in dispatch.fallback_counts()
        )
    finally:
        attnpatch.unregister_backend("flaky")
