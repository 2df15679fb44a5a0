"""Verify: sampled calls recomputed in float64 catch a deliberately lossy backend; warn, fallback and raise;
the reference itself agrees with an independent float64 implementation."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from reference import reference_attention  # noqa: E402

import attnpatch  # noqa: E402
from attnpatch import report, verify  # noqa: E402
from attnpatch.core import hooks, registry, selection  # noqa: E402
from attnpatch.errors import AttnpatchError  # noqa: E402

LOSSY = "test_lossy_3bit"


def quantize(t: torch.Tensor, bits: int = 3) -> torch.Tensor:
    """Symmetric per-tensor quantisation to ``bits`` bits: the kind of error an int8/fp8 kernel makes, larger."""
    levels = 2 ** (bits - 1) - 1
    step = t.abs().amax().clamp_min(1e-12) / levels
    return (t / step).round() * step


def lossy(query: torch.Tensor, key: torch.Tensor, *rest: Any) -> torch.Tensor:
    return registry.get_backend("native").fn(quantize(query), quantize(key), *rest)


@pytest.fixture(autouse=True)
def _lossy_backend() -> Iterator[None]:
    registry.register_backend(LOSSY, lossy, lossy=True, replace=True)
    yield
    verify.disable()
    report.disable()
    registry.unregister_backend(LOSSY)
    assert not hooks.observers and hooks.site_override(None) is None, "verify leaves no hook behind"


def qkv(seed: int = 0, batch: int = 2, seq: int = 16, heads: int = 4, dim: int = 16) -> torch.Tensor:
    return torch.randn(batch, seq, heads, dim, generator=torch.Generator().manual_seed(seed))


def call(site: str, spec: str, query: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    saved = selection.push_module(selection.resolve(spec), site)
    try:
        return attnpatch.dispatch_attention(query, query, query, **kwargs)
    finally:
        selection.pop_module(saved)


def call_per_layer(q: torch.Tensor, kv: torch.Tensor, cases: Any) -> None:
    """One attention call per case and backend (native, _native_math), each as layer ``layer.<case index>``."""
    for i, kwargs in enumerate(cases):
        for backend in ("native", "_native_math"):
            saved = selection.push_module(selection.resolve(backend), f"layer.{i}")
            try:
                attnpatch.dispatch_attention(q, kv, kv, **kwargs)
            finally:
                selection.pop_module(saved)


def test_catches_lossy_backend_and_warns_once_per_module() -> None:
    verify.enable(1, "warn")
    q = qkv()
    with pytest.warns(attnpatch.AttnpatchWarning, match=f"unet.attn1 on '{LOSSY}' differs from the float64"):
        call("unet.attn1", LOSSY, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call("unet.attn1", LOSSY, qkv(seed=1, seq=8))  # a new shape is checked again, fails, warns no more
    [first, second] = verify.results()
    assert not first.ok and not second.ok
    assert first.backend == LOSSY and first.worst > 1 and first.max_abs > 1e-2
    assert (first.atol, first.rtol) == registry.get_backend(LOSSY).caps.tolerance_for(torch.float32)
    [row] = verify.site_summary()
    assert row["checked"] == 2 and row["failed"] == 2 and row["action"] == "warned"


def test_native_passes_on_masks_gqa_causal_and_cross() -> None:
    verify.enable(1, "raise")
    q = qkv(heads=8)
    kv = qkv(seed=1, seq=24, heads=2)
    padding = torch.ones(2, 24, dtype=torch.bool)
    padding[1, :7] = False  # left padding
    additive = torch.randn(2, 1, 16, 24, generator=torch.Generator().manual_seed(2))
    cases = ({}, {"attn_mask": padding}, {"attn_mask": additive}, {"is_causal": True}, {"scale": 0.3})
    call_per_layer(q, kv, cases)
    checks = verify.results()
    assert len(checks) == 10
    assert all(c.ok for c in checks), [(c.backend, c.mask, c.worst) for c in checks if not c.ok]


def test_raise_action() -> None:
    verify.enable(1, "raise")
    with pytest.raises(verify.VerifyError, match=r"differs from the float64 reference .* --verify-action"):
        call("text_encoder.layers.0.attn", LOSSY, qkv())


def test_fallback_moves_module_to_native_and_fixes_the_failing_call() -> None:
    verify.enable(1, "fallback")
    report.enable()
    q = qkv()
    expected = attnpatch.dispatch_attention(q, q, q, backend="native")
    with pytest.warns(attnpatch.AttnpatchWarning, match="runs on 'native' for the rest of the run"):
        first = call("vae.decoder.attn", LOSSY, q)
    # the failing call itself returns the reference, and later calls run on native
    assert torch.allclose(first, expected, atol=1e-5)
    second = call("vae.decoder.attn", LOSSY, q)
    assert torch.equal(second, expected)
    with pytest.warns(attnpatch.AttnpatchWarning, match="unet.attn"):
        other = call("unet.attn", LOSSY, q)  # another module stays on the lossy backend until it fails itself
    assert torch.allclose(other, expected, atol=1e-5)
    assert verify.overridden() == {"vae.decoder.attn": "native", "unet.attn": "native"}
    sites = {s["site"]: s for s in report.snapshot()["sites"]}
    assert sites["vae.decoder.attn"]["requested"] == {LOSSY: 2}  # still shows what was asked for
    assert sites["vae.decoder.attn"]["served"] == {LOSSY: 1, "native": 1}
    assert sites["vae.decoder.attn"]["verify"]["action"] == "moved to native"
    verify.disable()
    assert not torch.equal(call("vae.decoder.attn", LOSSY, q), expected)  # disable() lifts the override


@pytest.mark.skipif(
    bool(__import__("attnpatch.testing.tiny", fromlist=["missing"]).missing()),
    reason="needs diffusers and transformers",
)
def test_fallback_rescues_a_real_pipeline() -> None:
    from attnpatch.cli import demo

    job = demo.workloads(steps=2)["sd"]
    pipe = job.build()
    native = job.run(attnpatch.apply(pipe, backend="native"))
    lossy_image = job.run(attnpatch.apply(pipe, backend=LOSSY))
    verify.enable(1, "fallback")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rescued = job.run(attnpatch.apply(pipe, backend=LOSSY))
    attnpatch.unapply(pipe)
    assert abs(lossy_image - native).max() > 1e-2
    assert abs(rescued - native).max() < 1e-4
    rows = verify.site_summary()
    assert rows and all(r["action"] == "moved to native" for r in rows)
    assert {r["site"].split(".")[0] for r in rows} == {"unet", "vae", "text_encoder"}


def test_sampling_first_per_module_and_shape_or_every_nth() -> None:
    q = qkv()
    verify.enable(1)
    for _ in range(4):
        call("a", "native", q)
        call("b", "native", q)
    call("a", "native", qkv(seq=8))
    assert [(c.site, c.query[1]) for c in verify.results()] == [("a", 16), ("b", 16), ("a", 8)]
    verify.enable(3)
    for _ in range(7):
        call("a", "native", q)
    assert len(verify.results()) == 3  # calls 1, 4 and 7


def test_dropout_calls_are_not_checked() -> None:
    verify.enable(1)
    q = qkv()
    attnpatch.dispatch_attention(q, q, q, dropout_p=0.5, backend=LOSSY)
    assert verify.results() == []


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("case", ["plain", "causal", "padding", "additive", "gqa_cross", "scale"])
def test_reference_matches_independent_float64(case: str, chunked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if chunked:
        monkeypatch.setattr(verify, "_CHUNK_BYTES", 4096)  # a few query rows per chunk
    q = qkv(heads=4, seq=20).half()
    kv = qkv(seed=1, heads=2 if case == "gqa_cross" else 4, seq=28 if case == "gqa_cross" else 20).half()
    kwargs: dict[str, Any] = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "padding":
        mask = torch.ones(2, 20, dtype=torch.bool)
        mask[0, :5] = False
        kwargs["attn_mask"] = mask
    elif case == "additive":
        kwargs["attn_mask"] = torch.randn(2, 4, 20, 20, generator=torch.Generator().manual_seed(3)).half()
    elif case == "scale":
        kwargs["scale"] = 0.05
    ours = verify.reference(q, kv, kv, **kwargs)
    theirs = reference_attention(q, kv, kv, **kwargs)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-10)


def test_compare_nan_fails() -> None:
    ref = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    out = torch.tensor([[[[0.0, float("nan")]], [[0.0, 0.0]]]])
    max_abs, _, worst = verify.compare(out, ref, 1e-3, 1e-3)
    assert max_abs != max_abs and not worst <= 1.0


@pytest.mark.parametrize("value", ["0", "-2", "often", "1.5"])
def test_bad_interval(value: str) -> None:
    with pytest.raises(AttnpatchError, match=r"verify interval .* positive integer"):
        verify.enable(value)


def test_bad_action() -> None:
    with pytest.raises(AttnpatchError, match="warn, fallback, raise"):
        verify.enable(1, "ignore")
    assert verify.parse_every("10") == 10 and verify.parse_every("1") == 1 and verify.parse_action(None) == "warn"


# --- issue 11: verify under install(), wrong outputs, growing caches --------------------------------------------


def lossy_cross(query: torch.Tensor, key: torch.Tensor, *rest: Any) -> torch.Tensor:
    """Lossy on cross-attention only (seq_q != seq_kv): some layers of a model fail, the others pass."""
    if query.shape[1] != key.shape[1]:
        query, key = quantize(query), quantize(key)
    return registry.get_backend("native").fn(query, key, *rest)


def test_fallback_under_install_moves_only_the_failing_layers() -> None:
    pytest.importorskip("diffusers")
    from attnpatch import api
    from attnpatch.testing import diffusers_models as dm

    registry.register_backend("test_lossy_cross", lossy_cross, lossy=True, replace=True)
    fam = dm.FAMILIES["unet"]
    unet = dm.build(fam)
    expected = dm.run(fam, unet)
    try:
        api.install("test_lossy_cross")  # the runner's way: no layer is marked
        verify.enable(1, "fallback")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rescued = dm.run(fam, unet)
        moved = verify.overridden()
        rows = {r["site"]: r for r in verify.site_summary()}
    finally:
        verify.disable()
        api.uninstall()
        registry.unregister_backend("test_lossy_cross")
    assert "<direct>" not in rows
    assert moved == {site: "native" for site in rows if site.endswith(".attn2")}, "cross-attention layers only"
    assert all(rows[site]["failed"] == 0 for site in rows if site.endswith(".attn1"))
    assert len(rows) == 8 and len(moved) == 4
    torch.testing.assert_close(rescued, expected, atol=1e-4, rtol=1e-4)


def wrong_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *rest: Any) -> torch.Tensor:
    return registry.get_backend("native").fn(query, key, value, *rest)[..., :-1]  # drops a channel of head_dim


@pytest.mark.parametrize("action", ["warn", "fallback"])
def test_a_wrong_shaped_output_is_a_failed_check_not_a_crash(action: str) -> None:
    registry.register_backend("test_wrong_shape", wrong_shape, replace=True)
    try:
        verify.enable(1, action)
        q = qkv()
        with pytest.warns(
            attnpatch.AttnpatchWarning, match=r"returned shape \(2, 16, 4, 15\), expected \(2, 16, 4, 16\)"
        ):
            out = call("unet.attn1", "test_wrong_shape", q)
        [check] = verify.results()
        assert not check.ok and check.worst == float("inf") and "returned shape" in check.note
        if action == "fallback":
            assert out.shape == q.shape  # the reference stands in for the broken output
            assert torch.allclose(out, attnpatch.dispatch_attention(q, q, q, backend="native"), atol=1e-5)
        else:
            assert out.shape == (2, 16, 4, 15)  # warn changes nothing, as documented
    finally:
        verify.disable()
        registry.unregister_backend("test_wrong_shape")


def test_a_growing_kv_cache_is_checked_per_power_of_two_not_per_step() -> None:
    verify.enable(1)
    query = qkv(seq=1)
    for length in range(1, 65):  # decode: one query token, a KV cache one token longer each step
        kv = qkv(seed=length, seq=length)
        saved = selection.push_module(selection.resolve("native"), "model.layers.0.self_attn")
        try:
            attnpatch.dispatch_attention(query, kv, kv)
        finally:
            selection.pop_module(saved)
    assert [c.key[1] for c in verify.results()] == [1, 2, 3, 5, 9, 17, 33]
    assert verify.bucket(33) == verify.bucket(64) == 64 and verify.bucket(1) == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_calls_with_softcap_window_sinks_are_checked_with_them(chunked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 12's arguments reach verify (CallRecord.extra) and its float64 reference applies them: routed Gemma 2 /
    # gpt-oss calls are not reported as mismatches. Chunked: the window stays relative to each query's position.
    if chunked:
        monkeypatch.setattr(verify, "_CHUNK_BYTES", 4096)  # a few query rows per chunk
    verify.enable(1, "raise")
    q = qkv(heads=4, seq=20)
    kv = qkv(seed=1, heads=2, seq=20)
    sinks = torch.linspace(-1.0, 1.0, 4)
    cases: list[dict[str, Any]] = [
        {"softcap": 2.0},
        {"window": (3, 0)},
        {"sinks": sinks},
        {"softcap": 2.0, "window": (4, 2), "sinks": sinks, "attn_mask": torch.ones(2, 20, dtype=torch.bool)},
    ]
    call_per_layer(q, kv, cases)
    checks = verify.results()
    assert len(checks) == 8 and all(c.ok for c in checks), [(c.site, c.backend, c.worst) for c in checks if not c.ok]
    for kwargs in cases[:3]:  # each argument changes the reference: the checks above compared something
        assert not torch.allclose(verify.reference(q, kv, kv), verify.reference(q, kv, kv, **kwargs))
