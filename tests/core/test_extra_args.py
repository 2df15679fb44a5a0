"""The later arguments of the dispatcher (softcap, window, sinks, return_lse) against a float64 reference.

Parametrized over the registry: every backend that declares an argument is compared with :func:`reference` (written
here independently of attnpatch/backends/_math.py: the sink is an extra softmax column, the window a loop over
positions); a backend that cannot serve a case here is skipped with its own reasons. Tolerances are each backend's
own (Capabilities.tolerance_for), lse to the same atol.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import pytest
import torch

from attnpatch.core import dispatch, masks, registry, selection
from attnpatch.core.call import MASK_ADDITIVE, MASK_BOOL, MASK_NONE, CallSpec, check_extras
from attnpatch.errors import CheckFailed

EXTRA_NAMES = ("softcap", "window", "sinks", "return_lse")


def reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    window: tuple[int, int] | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Sq, H, Dv), lse (B, Sq, H)) in float64. Masks as the dispatcher takes them (2-D = key padding)."""
    q, k, v = (t.double().transpose(1, 2) for t in (query, key, value))
    batch, heads, seq_q, dim = q.shape
    seq_kv = k.shape[2]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * (1 / math.sqrt(dim) if scale is None else scale)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    keep = torch.ones(batch, heads, seq_q, seq_kv, dtype=torch.bool)
    if attn_mask is not None:
        m = attn_mask
        m = m[:, None, None, :] if m.dim() == 2 else m[:, None] if m.dim() == 3 else m
        if m.is_floating_point():
            logits = logits + m.double()
        else:
            keep &= m != 0
    for i in range(seq_q):
        for j in range(seq_kv):
            if is_causal and j > i:
                keep[..., i, j] = False
            if window is not None:
                left, right = window
                if (left >= 0 and j < i - left) or (right >= 0 and j > i + right):
                    keep[..., i, j] = False
    logits = logits.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf where a row has no key
    column = torch.full((batch, heads, seq_q, 1), float("-inf"), dtype=torch.float64)
    if sinks is not None:
        column = sinks.double().view(1, heads, 1, 1).expand(batch, heads, seq_q, 1)
    full = torch.cat([logits, column], dim=-1)
    attended = torch.isfinite(full).any(dim=-1, keepdim=True)
    probs = torch.softmax(full.masked_fill(~attended, 0.0), dim=-1).masked_fill(~attended, 0.0)[..., :-1]
    probs = probs.masked_fill(~keep, 0.0)
    out = (probs @ v).transpose(1, 2)
    if sinks is None:  # no key and no sink: 0 by the convention (the softmax of nothing)
        out = out.masked_fill(torch.isneginf(lse).transpose(1, 2).unsqueeze(-1), 0.0)
    return out, lse.transpose(1, 2)


@dataclass(frozen=True)
class Case:
    name: str
    batch: int = 2
    seq_q: int = 11
    seq_kv: int = 11
    heads: int = 4
    heads_kv: int = 4
    head_dim: int = 16
    head_dim_v: int | None = None  # None: head_dim
    mask: str = "none"  # none | left_pad | additive
    causal: bool = False
    scale: float | None = None
    softcap: float | None = None
    window: tuple[int, int] | None = None
    sinks: bool = False
    lse: bool = False
    dtype: torch.dtype = torch.float32

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        g = torch.Generator().manual_seed(sum(map(ord, self.name)))
        q = torch.randn(self.batch, self.seq_q, self.heads, self.head_dim, generator=g) * 2  # logits large enough
        k = torch.randn(self.batch, self.seq_kv, self.heads_kv, self.head_dim, generator=g) * 2  # to be capped
        v = torch.randn(self.batch, self.seq_kv, self.heads_kv, self.dim_v, generator=g)
        mask = None
        if self.mask == "left_pad":
            mask = torch.ones(self.batch, self.seq_kv, dtype=torch.long)
            mask[0, : self.seq_kv // 2] = 0
        elif self.mask == "additive":
            mask = torch.randn(self.batch, 1, self.seq_q, self.seq_kv, generator=g)
            mask[:, :, :, :2] = float("-inf")
        sinks = torch.randn(self.heads, generator=g) if self.sinks else None
        q, k, v = (t.to(self.dtype) for t in (q, k, v))
        return q, k, v, (mask.to(self.dtype) if mask is not None and mask.is_floating_point() else mask), sinks

    @property
    def dim_v(self) -> int:
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    def extra(self, sinks: torch.Tensor | None) -> dict[str, object]:
        given: dict[str, object] = {"softcap": self.softcap, "window": self.window, "sinks": sinks}
        given = {name: value for name, value in given.items() if value is not None}
        return given | ({"return_lse": True} if self.lse else {})


CASES = [
    Case("softcap", softcap=1.5),
    Case("softcap_scale", softcap=2.0, scale=0.4),
    Case("softcap_value_dim", softcap=2.0, head_dim=16, head_dim_v=24),
    Case("window_both", window=(3, 2)),
    Case("window_left_causal", window=(4, -1), causal=True),
    Case("window_right_only", window=(-1, 1)),
    Case("window_zero", window=(0, 0)),
    Case("window_cross_77", seq_q=9, seq_kv=77, window=(5, 3)),
    Case("window_cross_more_queries", seq_q=13, seq_kv=6, window=(2, 0)),  # queries 8-12 see no key
    Case("sinks", sinks=True),
    Case("sinks_lse_value_dim", sinks=True, lse=True, head_dim_v=8),
    Case("sinks_causal", sinks=True, causal=True),
    Case("lse", lse=True),
    Case("lse_left_pad", lse=True, mask="left_pad"),
    Case("lse_causal_cross", lse=True, causal=True, seq_q=5, seq_kv=9),
    Case("lse_fully_masked_rows", lse=True, window=(1, 0), seq_q=12, seq_kv=5),
    Case("softcap_window_gqa_left_pad", softcap=1.0, window=(4, 0), mask="left_pad", heads=8, heads_kv=2),
    Case("softcap_window_sinks_gqa", softcap=1.0, window=(4, 0), sinks=True, heads=8, heads_kv=2, lse=True),
    Case(
        "all_left_pad_cross_odd_dim",
        softcap=3.0,
        window=(6, 2),
        sinks=True,
        lse=True,
        mask="left_pad",
        heads=6,
        heads_kv=3,
        head_dim=13,
        head_dim_v=21,
        seq_q=7,
        seq_kv=77,
    ),
    Case("all_additive_causal", softcap=1.0, window=(2, -1), sinks=True, lse=True, mask="additive", causal=True),
    Case("softcap_mqa_cross", softcap=2.5, heads=4, heads_kv=1, seq_q=5, seq_kv=77, lse=True),
    Case("float64_all", softcap=1.0, window=(3, 3), sinks=True, lse=True, dtype=torch.float64, seq_q=65, seq_kv=65),
    Case("bf16_all", softcap=1.0, window=(3, 0), sinks=True, lse=True, dtype=torch.bfloat16),
]


def _declares(backend: registry.Backend, case: Case) -> bool:
    return all(getattr(backend.caps, name) for name, on in zip(EXTRA_NAMES, _flags(case), strict=True) if on)


def _flags(case: Case) -> tuple[bool, bool, bool, bool]:
    return case.softcap is not None, case.window is not None, case.sinks, case.lse


def _declaring() -> list[registry.Backend]:
    return [b for b in registry.list_backends() if any(getattr(b.caps, name) for name in EXTRA_NAMES)]


def _spec(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, sinks):
    norm, kind = (None, MASK_NONE) if mask is None else masks.normalize(mask, q, k)
    causal = case.causal
    if norm is not None and causal:
        kind, causal = (MASK_BOOL if norm.dtype == torch.bool else MASK_ADDITIVE), False
    given, causal = check_extras(q, k, norm, causal, case.extra(sinks))
    return CallSpec.of(q, k, v, kind, 0.0, causal, case.scale, **given)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", _declaring(), ids=lambda b: b.name)
def test_backend_matches_float64_reference(backend: registry.Backend, case: Case) -> None:
    if not _declares(backend, case):
        pytest.skip(f"{backend.name} does not declare every argument of this case")
    if backend.name == "flex" and case.name not in FLEX_CASES:
        pytest.skip("flex: subset only (each call kind compiles a kernel)")
    q, k, v, mask, sinks = case.inputs()
    reasons = backend.call_reasons(_spec(case, q, k, v, mask, sinks))
    if reasons:
        pytest.skip(f"{backend.name}: {'; '.join(reasons)}")
    selection.set_strict(True)  # a silent fallback would make this test compare the wrong backend
    result = dispatch.dispatch_attention(
        q, k, v, mask, is_causal=case.causal, scale=case.scale, backend=backend.name, **case.extra(sinks)
    )
    out, lse = result if case.lse else (result, None)
    ref_out, ref_lse = reference(q, k, v, mask, case.causal, case.scale, case.softcap, case.window, sinks)
    assert out.shape == (case.batch, case.seq_q, case.heads, case.dim_v) and out.dtype == case.dtype
    assert not torch.isnan(out).any()
    atol, rtol = backend.caps.tolerance_for(case.dtype)
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    if lse is not None:
        assert lse.shape == (case.batch, case.seq_q, case.heads) and lse.dtype == torch.float32
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows with no key: lse -inf, only there"
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=max(atol, 1e-5), rtol=rtol)
    if case.name == "lse_fully_masked_rows":
        assert torch.isneginf(lse[:, 6:]).all() and torch.equal(out[:, 6:], torch.zeros_like(out[:, 6:]))


# flex compiles a kernel per call kind (~5 s each on 2 cores): a representative subset.
FLEX_CASES = {
    "softcap",
    "window_cross_77",
    "lse_left_pad",
    "window_cross_more_queries",
    "softcap_window_gqa_left_pad",
    "all_left_pad_cross_odd_dim",
    "bf16_all",
}


def test_each_argument_is_served_by_the_references() -> None:
    for name in ("native", "_native_math"):
        caps = registry.get_backend(name).caps
        assert all(getattr(caps, argument) for argument in EXTRA_NAMES) and caps.lse_grad, name


def test_gradients_match_the_reference_through_every_argument() -> None:
    case = Case("grad", softcap=1.5, window=(3, 1), sinks=True, heads=4, heads_kv=2, seq_q=9, seq_kv=12)
    q, k, v, _, sinks = case.inputs()
    q, k, v, sinks = (t.double().requires_grad_() for t in (q, k, v, sinks))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :7] = False  # query rows 0-3 of batch 0 see no key (window + padding): finite gradients there too
    for name in ("native", "_native_math"):
        out, lse = dispatch.dispatch_attention(
            q, k, v, mask, backend=name, softcap=1.5, window=(3, 1), sinks=sinks, return_lse=True
        )
        grads = torch.autograd.grad((out.sum() + lse[torch.isfinite(lse)].sum()), (q, k, v, sinks))
        ref_out, ref_lse = reference(q, k, v, mask, softcap=1.5, window=(3, 1), sinks=sinks)
        ref_grads = torch.autograd.grad(ref_out.sum() + ref_lse[torch.isfinite(ref_lse)].sum(), (q, k, v, sinks))
        for got, want in zip(grads, ref_grads, strict=True):
            assert torch.isfinite(got).all(), name
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)


def test_sinks_formula_of_the_contract() -> None:
    q, k, v, _, sinks = Case("formula", sinks=True).inputs()
    plain, lse = dispatch.dispatch_attention(q, k, v, return_lse=True)
    out = dispatch.dispatch_attention(q, k, v, sinks=sinks)
    torch.testing.assert_close(out, plain * torch.sigmoid(lse - sinks).unsqueeze(-1), atol=1e-6, rtol=1e-5)


def test_softcap_changes_the_result_and_a_large_cap_does_not() -> None:
    q, k, v, _, _ = Case("cap").inputs()
    plain = dispatch.dispatch_attention(q, k, v)
    assert not torch.allclose(dispatch.dispatch_attention(q, k, v, softcap=1.0), plain, atol=1e-3)
    torch.testing.assert_close(dispatch.dispatch_attention(q, k, v, softcap=1e6), plain, atol=1e-5, rtol=1e-4)


def test_trivial_windows_are_plain_calls() -> None:
    q, k, v, _, _ = Case("trivial").inputs()
    assert check_extras(q, k, None, False, {"window": (-1, -1)}) == ({}, False)
    assert check_extras(q, k, None, False, {"window": (-1, 0)}) == ({}, True)  # causal
    assert check_extras(q, k, None, True, {"window": (5, 7)}) == ({"window": (5, 0)}, False)
    torch.testing.assert_close(
        dispatch.dispatch_attention(q, k, v, window=(-1, 0)), dispatch.dispatch_attention(q, k, v, is_causal=True)
    )


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"softcap": 0.0}, "softcap=0.0"),
        ({"softcap": -1}, "softcap=-1"),
        ({"softcap": float("inf")}, "finite number > 0"),
        ({"softcap": True}, "softcap=True"),
        ({"window": 4}, "window=4"),
        ({"window": (4, -2)}, "(left, right)"),
        ({"window": (1.5, 0)}, "two ints"),
        ({"sinks": torch.zeros(3)}, "(heads=4,)"),
        ({"sinks": torch.zeros(4, dtype=torch.long)}, "float tensor"),
        ({"return_lse": 1}, "return_lse=1"),
    ],
)
def test_bad_values_are_named_with_the_rule(extra: dict[str, object], words: str) -> None:
    q, k, v, _, _ = Case("bad").inputs()
    with pytest.raises(CheckFailed, match=None) as raised:
        dispatch.dispatch_attention(q, k, v, **extra)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_an_unknown_keyword_is_a_type_error() -> None:
    q, k, v, _, _ = Case("bad").inputs()
    with pytest.raises(TypeError, match=r"'softcapping'.*softcap, window, sinks, return_lse"):
        dispatch.dispatch_attention(q, k, v, softcapping=1.0)
    with pytest.raises(TypeError, match="'softcapping'"):
        dispatch.route(q, k, v, softcapping=1.0)


def test_signatures_name_the_arguments() -> None:
    for fn in (dispatch.dispatch_attention, dispatch.route):
        params = inspect.signature(fn).parameters
        for name in EXTRA_NAMES:
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (fn.__name__, name)


@pytest.mark.parametrize(
    ("argument", "value", "words"),
    [
        ("softcap", 2.0, "has no logit soft-capping (softcap=...)"),
        ("window", (2, 2), "has no sliding window (window=...)"),
        ("sinks", "tensor", "has no attention sinks (sinks=...)"),
        ("return_lse", True, "does not return the log-sum-exp (return_lse=True)"),
    ],
)
def test_a_backend_that_does_not_declare_an_argument_never_receives_it(argument, value, words) -> None:
    seen: list[dict[str, object]] = []

    def plain(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, **extra):
        seen.append(extra)
        return torch.zeros(*q.shape[:3], v.shape[-1])

    registry.register_backend("_test_plain", plain, replace=True)
    try:
        q, k, v, _, sinks = Case("undeclared", sinks=True).inputs()
        given = {argument: sinks if value == "tensor" else value}
        with pytest.warns(Warning, match=None) as warned:
            result = dispatch.dispatch_attention(q, k, v, backend="_test_plain", **given)
        out = result[0] if argument == "return_lse" else result
        assert seen == [] and not torch.equal(out, torch.zeros_like(out))  # native served it
        assert any(words in str(w.message) for w in warned)
        assert any(key[1:3] == ("_test_plain", "native") for key in _fallback_keys(words))
        selection.set_strict(True)
        with pytest.raises(dispatch.UnsupportedCall, match=words.replace("(", r"\(").replace(")", r"\)")):
            dispatch.dispatch_attention(q, k, v, backend="_test_plain", **given)
        dispatch.dispatch_attention(q, k, v, backend="_test_plain")  # a plain call still reaches it
        assert seen == [{}]
    finally:
        registry.unregister_backend("_test_plain")


def _fallback_keys(words: str) -> list[tuple[str, str, str, str]]:
    return [key for key in dispatch.fallback_counts() if words in key[3]]


def test_a_backend_that_declares_an_argument_receives_it_as_a_keyword() -> None:
    seen: list[dict[str, object]] = []

    def capped(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, **extra):
        seen.append(extra)
        out = torch.zeros(*q.shape[:3], v.shape[-1])
        return (out, torch.zeros(q.shape[:3])) if extra.get("return_lse") else out

    registry.register_backend("_test_capped", capped, replace=True, softcap=True, window=True, return_lse=True)
    try:
        q, k, v, _, _ = Case("declared").inputs()
        selection.set_default_backend("_test_capped")
        for _ in range(2):  # the second call is answered from the decision cache
            dispatch.dispatch_attention(q, k, v, softcap=2.0, window=(1, 2), return_lse=True)
        dispatch.dispatch_attention(q, k, v)  # the fast path: no later arguments
        assert seen == [{"softcap": 2.0, "window": (1, 2), "return_lse": True}] * 2 + [{}]
    finally:
        selection.set_default_backend("native")
        registry.unregister_backend("_test_capped")


def test_the_decision_cache_tells_calls_with_and_without_arguments_apart() -> None:
    q, k, v, mask, sinks = Case("cache", mask="left_pad", sinks=True).inputs()
    selection.set_default_backend("flex,native")  # not a fast chain: the decision cache answers repeated calls
    for _ in range(2):
        plain = dispatch.dispatch_attention(q, k, v, mask)
        capped = dispatch.dispatch_attention(q, k, v, mask, softcap=1.0, sinks=sinks)
    ref, _ = reference(q, k, v, mask, softcap=1.0, sinks=sinks)
    torch.testing.assert_close(capped.double(), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(plain.double(), reference(q, k, v, mask)[0], atol=2e-5, rtol=1e-4)


def test_return_lse_is_diffusers_context_parallel_layout() -> None:
    # diffusers 0.42.1 attention_dispatch.py: every *_forward_op returns lse (batch, seq_q, heads) (flash's
    # (B, H, S) permuted "lse.permute(0, 2, 1)"), and the ring merge unsqueezes it to broadcast with out (B, S, H, D).
    q, k, v, _, _ = Case("layout", seq_q=5, seq_kv=9, heads=3, heads_kv=3).inputs()
    out, lse = dispatch.dispatch_attention(q, k, v, return_lse=True)
    assert lse.shape == (2, 5, 3) and lse.dtype == torch.float32
    first, lse_a = dispatch.dispatch_attention(q, k[:, :4], v[:, :4], return_lse=True)
    second, lse_b = dispatch.dispatch_attention(q, k[:, 4:], v[:, 4:], return_lse=True)
    merged = first - torch.sigmoid(lse_b - lse_a).unsqueeze(-1) * (first - second)  # diffusers' ring merge
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.logaddexp(lse_a, lse_b), lse, atol=1e-5, rtol=1e-5)


def test_describe_names_the_arguments() -> None:
    q, k, v, _, sinks = Case("describe", sinks=True).inputs()
    call = CallSpec.of(q, k, v, MASK_NONE, 0.0, False, None, softcap=1.0, window=(1, 1), sinks=sinks, return_lse=True)
    assert call.describe().endswith("softcap, window, sinks, return_lse")
    assert CallSpec.of(q, k, v, MASK_NONE, 0.0, False, None, sinks=sinks.requires_grad_()).needs_grad


@pytest.mark.parametrize(
    ("backend", "with_lse"), [("native", True), ("flex", False)], ids=["native_all", "flex_softcap_window"]
)
def test_compiled_fullgraph_matches_eager(backend: str, with_lse: bool) -> None:
    # No graph break (fullgraph=True) and the same answer as eager; flex's CPU kernel has no lse, so no sinks there.
    q, k, v, _, sinks = Case("compiled", sinks=True, heads=4, heads_kv=2).inputs()
    extra: dict[str, object] = {"softcap": 2.0, "window": (3, 0)}
    if with_lse:
        extra |= {"sinks": sinks, "return_lse": True}

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> object:
        return dispatch.dispatch_attention(q, k, v, backend=backend, **extra)

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True)(q, k, v)
    eager = attend(q, k, v)
    for got, want in zip(compiled if with_lse else [compiled], eager if with_lse else [eager], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    ref_out, ref_lse = reference(q, k, v, softcap=2.0, window=(3, 0), sinks=sinks if with_lse else None)
    torch.testing.assert_close((compiled[0] if with_lse else compiled).double(), ref_out, atol=2e-5, rtol=1e-4)
    if with_lse:
        torch.testing.assert_close(compiled[1].double(), ref_lse, atol=2e-5, rtol=1e-5)


def test_observers_see_the_output_but_cannot_replace_it_without_the_arguments() -> None:
    # hooks.CallRecord has no softcap/window/sinks: a replacement (verify's fallback action) computed from the record
    # would be plain attention. It is ignored for such calls; plain calls can still be replaced.
    from attnpatch.core import hooks

    q, k, v, _, _ = Case("observed").inputs()
    seen: list[torch.Tensor] = []

    def replace_with_zeros(record: hooks.CallRecord) -> torch.Tensor:
        seen.append(record.output)
        return torch.zeros_like(record.output)

    hooks.add_observer(replace_with_zeros)
    try:
        capped, lse = dispatch.dispatch_attention(q, k, v, softcap=1.0, return_lse=True)
        plain = dispatch.dispatch_attention(q, k, v)
    finally:
        hooks.remove_observer(replace_with_zeros)
    assert len(seen) == 2 and seen[0] is capped and lse.shape == (2, 11, 4)
    torch.testing.assert_close(capped.double(), reference(q, k, v, softcap=1.0)[0], atol=2e-5, rtol=1e-4)
    assert torch.equal(plain, torch.zeros_like(plain))


def test_per_device_refusals_name_the_argument() -> None:
    from attnpatch.testing import emulate_device

    q, k, v, _, sinks = Case("devices", sinks=True).inputs()

    def reasons(name: str, **flags: object) -> list[str]:
        return registry.get_backend(name).call_reasons(CallSpec.of(q, k, v, MASK_NONE, 0.0, False, None, **flags))

    # flex on CPU: no lse (torch 2.13's CPU kernel has none), so no sinks either; softcap and window are served.
    assert any("returns no lse" in r for r in reasons("flex", return_lse=True))
    assert any("returns no lse" in r for r in reasons("flex", sinks=sinks))
    assert reasons("flex", softcap=1.0, window=(2, 2)) == []
    assert reasons("_native_flash", window=(2, 2), return_lse=True, sinks=sinks) == []  # CPU: all three
    with emulate_device("cuda", capability=(9, 0)):
        half = [t.half() for t in (q, k, v)]
        spec = CallSpec.of(*half, MASK_NONE, 0.0, False, None, window=(2, 2), return_lse=True)
        got = registry.get_backend("_native_flash").call_reasons(spec)
        assert any("takes no window on CUDA" in r for r in got) and any("returns no lse on CUDA" in r for r in got)
