"""Selection precedence, contexts, threads, fallback chains, strict mode, auto, checks and names."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import attnpatch
from attnpatch.core import dispatch, registry, selection
from attnpatch.core.call import MASK_NONE, CallSpec
from attnpatch.errors import AttnpatchWarning, CheckFailed, UnknownBackendError, UnsupportedCall

SEED_NAMES = [
    "native",
    "flex",
    "_native_cudnn",
    "_native_efficient",
    "_native_flash",
    "_native_math",
    "_native_npu",
    "_native_xla",
    "flash",
    "flash_varlen",
    "aiter",
    "_flash_3",
    "_flash_varlen_3",
    "_flash_3_hub",
    "sage",
    "sage_varlen",
    "_sage_qk_int8_pv_fp8_cuda",
    "_sage_qk_int8_pv_fp8_cuda_sm90",
    "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton",
    "xformers",
    "flash_hub",
    "flash_varlen_hub",
    "flash_4_hub",
    "_flash_3_varlen_hub",
    "aiter_fa2_hub",
    "sage_hub",
    "sage_blackwell_hub",
]
ALIASES = {"sdpa": "native", "math": "_native_math", "flash_attn": "flash", "sage_attn": "sage", "flex_attn": "flex"}


def qkv(batch: int = 1, seq: int = 6, heads: int = 2, dim: int = 16) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, seq, heads, dim) for _ in range(3))


@pytest.fixture
def tagged():
    """Backends 'tag_a' / 'tag_b' / 'tag_c' that compute native attention times 1, 2, 3: the output says who ran."""
    native = registry.get_backend("native").fn
    names = []
    for factor, name in enumerate(("tag_a", "tag_b", "tag_c"), start=1):

        def fn(q, k, v, m, d, c, s, g, factor=factor):
            return native(q, k, v, m, d, c, s, g) * factor

        attnpatch.register_backend(name, fn)
        names.append(name)
    yield
    for name in names:
        attnpatch.unregister_backend(name)


def who_ran(out: torch.Tensor, q: torch.Tensor) -> float:
    ref = dispatch.dispatch_attention(q, q, q, backend="native")
    return round((out / ref).mean().item())


@pytest.mark.parametrize("name", SEED_NAMES)
def test_every_seed_name_resolves(name: str) -> None:
    backend = attnpatch.get_backend(name)
    assert backend.name == name
    assert isinstance(backend.reasons, list)
    assert backend.available or backend.reasons  # unavailable ones say why


@pytest.mark.parametrize(("alias", "target"), sorted(ALIASES.items()))
def test_common_spellings_are_aliases(alias: str, target: str) -> None:
    assert attnpatch.get_backend(alias).name == target
    assert attnpatch.get_backend(alias.upper().replace("_", "-")).name == target


def test_unknown_name_is_one_clear_line() -> None:
    with pytest.raises(UnknownBackendError) as info:
        attnpatch.dispatch_attention(*qkv(), backend="flsh")
    message = str(info.value)
    assert "\n" not in message
    assert "'flsh'" in message and "did you mean" in message and "'flash'" in message
    assert "python -m attnpatch list" in message


def test_precedence_call_over_context_over_default(tagged) -> None:
    q, _, _ = qkv()
    attnpatch.set_default_backend("tag_a")
    assert who_ran(attnpatch.dispatch_attention(q, q, q), q) == 1
    with attnpatch.attention_backend("tag_b"):
        assert who_ran(attnpatch.dispatch_attention(q, q, q), q) == 2
        assert who_ran(attnpatch.dispatch_attention(q, q, q, backend="tag_c"), q) == 3
        saved = selection.push_module(selection.resolve("tag_c"), "layer")  # per-module beats the context
        try:
            assert who_ran(attnpatch.dispatch_attention(q, q, q), q) == 3
        finally:
            selection.pop_module(saved)
    attnpatch.set_default_backend(None)
    assert attnpatch.get_default_backend() == "native"


def test_nested_contexts_restore_after_exceptions(tagged) -> None:
    q, _, _ = qkv()
    with attnpatch.attention_backend("tag_a"):
        with pytest.raises(RuntimeError), attnpatch.attention_backend("tag_b"):
            assert attnpatch.current_backend() == "tag_b"
            raise RuntimeError("boom")
        assert attnpatch.current_backend() == "tag_a"
        ctx = attnpatch.attention_backend("tag_c")
        with ctx, ctx:  # re-entering the same object nests too
            assert who_ran(attnpatch.dispatch_attention(q, q, q), q) == 3
        assert who_ran(attnpatch.dispatch_attention(q, q, q), q) == 1
    assert attnpatch.current_backend() == "native"


def test_context_is_also_a_decorator(tagged) -> None:
    q, _, _ = qkv()

    @attnpatch.attention_backend("tag_b")
    def run() -> torch.Tensor:
        return attnpatch.dispatch_attention(q, q, q)

    assert who_ran(run(), q) == 2
    assert attnpatch.current_backend() == "native"


def test_eight_threads_never_see_each_others_choice(tagged) -> None:
    names = ["tag_a", "tag_b", "tag_c", "native"] * 2
    expected = {"tag_a": 1, "tag_b": 2, "tag_c": 3, "native": 1}
    barrier = threading.Barrier(len(names))
    errors: list[str] = []

    def worker(name: str) -> None:
        q, _, _ = qkv()
        with attnpatch.attention_backend(name):
            barrier.wait()  # every thread is inside its own context before anyone dispatches
            for _ in range(50):
                if attnpatch.current_backend() != name:
                    errors.append(f"{name} saw {attnpatch.current_backend()}")
                got = who_ran(attnpatch.dispatch_attention(q, q, q), q)
                if got != expected[name]:
                    errors.append(f"{name} ran factor {got}")
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]


def test_fallback_warns_once_per_reason_and_counts(tagged) -> None:
    attnpatch.register_backend("fp16_only", registry.get_backend("native").fn, dtypes={torch.float16})
    try:
        q, _, _ = qkv()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                out = attnpatch.dispatch_attention(q, q, q, backend="fp16_only,tag_b")
        assert who_ran(out, q) == 2
        ours = [w for w in caught if issubclass(w.category, AttnpatchWarning)]
        assert len(ours) == 1
        text = str(ours[0].message)
        assert "'fp16_only'" in text and "float16" in text and "'tag_b'" in text
        counts = attnpatch.fallback_counts()
        assert sum(n for (chain, refused, served, _), n in counts.items() if refused == "fp16_only") == 3
    finally:
        attnpatch.unregister_backend("fp16_only")


def test_chain_ends_in_native_unless_strict() -> None:
    attnpatch.register_backend("never", lambda *a: None, devices={"npu"})
    try:
        q, _, _ = qkv()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AttnpatchWarning)
            out = attnpatch.dispatch_attention(q, q, q, backend="never")
        torch.testing.assert_close(out, attnpatch.dispatch_attention(q, q, q))
        attnpatch.set_strict(True)
        with pytest.raises(UnsupportedCall) as info:
            attnpatch.dispatch_attention(q, q, q, backend="never,native")
        message = str(info.value)
        assert "never" in message and "runs on npu" in message and "strict" in message
        assert "native" in info.value.reasons and info.value.reasons["never"]
    finally:
        attnpatch.unregister_backend("never")


def test_auto_picks_highest_priority_that_serves_and_skips_lossy() -> None:
    native = registry.get_backend("native").fn
    attnpatch.register_backend("fast_lossy", lambda *a: native(*a) * 5, lossy=True, priority=100)
    attnpatch.register_backend("fast_exact", lambda *a: native(*a) * 4, priority=90, max_head_dim=8)
    try:
        q, _, _ = qkv(dim=16)
        assert who_ran(attnpatch.dispatch_attention(q, q, q, backend="auto"), q) == 1  # fast_exact refuses D=16
        small, _, _ = qkv(dim=8)
        assert who_ran(attnpatch.dispatch_attention(small, small, small, backend="auto"), small) == 4
        attnpatch.set_allow_lossy(True)
        assert who_ran(attnpatch.dispatch_attention(small, small, small, backend="auto"), small) == 5
    finally:
        attnpatch.unregister_backend("fast_lossy")
        attnpatch.unregister_backend("fast_exact")


def test_auto_on_cpu_is_native() -> None:
    q, _, _ = qkv()
    call = CallSpec.of(q, q, q, MASK_NONE, 0.0, False, None)
    assert dispatch.auto_candidates(call)[0].name == "native"


def test_register_backend_rules() -> None:
    with pytest.raises(ValueError, match="replace=True"):
        attnpatch.register_backend("native", lambda *a: None)
    with pytest.raises(TypeError, match="unknown capabilities"):
        attnpatch.register_backend("x", lambda *a: None, max_headdim=8)
    with pytest.raises(TypeError, match="callable"):
        attnpatch.register_backend("x", "not a function")
    original = registry.get_backend("native")
    try:
        attnpatch.register_backend("native", lambda *a: original.fn(*a) * 2, replace=True)
        q, _, _ = qkv()
        ref = original.fn(q, q, q, None, 0.0, False, None, False)
        torch.testing.assert_close(attnpatch.dispatch_attention(q, q, q), ref * 2)
    finally:
        registry.register(original, replace=True)
    q, _, _ = qkv()
    torch.testing.assert_close(
        attnpatch.dispatch_attention(q, q, q), original.fn(q, q, q, None, 0.0, False, None, False)
    )


def test_checks_name_tensor_value_and_rule() -> None:
    attnpatch.set_checks(True)
    q, k, v = qkv()
    with pytest.raises(CheckFailed, match=r"key is torch.float64, query torch.float32"):
        attnpatch.dispatch_attention(q, k.double(), v)
    with pytest.raises(CheckFailed, match=r"must be 4-D"):
        attnpatch.dispatch_attention(q[0], k, v)
    with pytest.raises(CheckFailed, match=r"query heads 2 is not a multiple of key/value heads 3"):
        kk = torch.randn(1, 6, 3, 16)
        attnpatch.dispatch_attention(q, kk, kk)
    with pytest.raises(CheckFailed, match=r"is_causal"):
        attnpatch.dispatch_attention(q, k, v, attn_mask=torch.ones(1, 6, dtype=torch.bool), is_causal=True)
    with pytest.raises(CheckFailed, match=r"query head_dim 16 != key head_dim 8"):
        attnpatch.dispatch_attention(q, k[..., :8], v)


def test_bad_mask_shape_is_an_error_even_without_checks() -> None:
    q, k, v = qkv(batch=2)
    with pytest.raises(CheckFailed, match=r"2-D mask is key padding"):
        attnpatch.dispatch_attention(q, k, v, attn_mask=torch.ones(6, 6, dtype=torch.bool))
    # On native a 4-D bool or same-dtype additive mask goes to torch's SDPA as it is; one SDPA refuses still gets
    # the dispatcher's one-line error, not torch's (and not both).
    for mask in (torch.ones(2, 1, 6, 5, dtype=torch.bool), torch.zeros(2, 1, 6, 5), torch.zeros(3, 1, 6, 6)):
        with pytest.raises(CheckFailed, match=r"4-D mask must broadcast") as raised:
            attnpatch.dispatch_attention(q, k, v, attn_mask=mask)
        assert raised.value.__cause__ is None and raised.value.__suppress_context__
    # A mask with more batch rows than the query: SDPA must not broadcast the output up to them.
    q1, k1, v1 = qkv(batch=1)
    with pytest.raises(CheckFailed, match=r"4-D mask must broadcast"):
        attnpatch.dispatch_attention(q1, k1, v1, attn_mask=torch.ones(2, 1, 1, 6, dtype=torch.bool))


@pytest.mark.parametrize("name", ["native", "_native_math", "flex"])
def test_compile_fullgraph_has_no_graph_breaks(name: str) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q, k, v = qkv(batch=2, seq=8, heads=2, dim=16)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with attnpatch.attention_backend(name):
            return attnpatch.dispatch_attention(q, k, v, is_causal=True)

    out = torch.compile(f, fullgraph=True)(q, k, v)
    assert sum(counters["graph_break"].values()) == 0
    torch.testing.assert_close(out, attnpatch.dispatch_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-4)


def test_compiled_function_follows_a_context_set_outside(tagged) -> None:
    """A selection read inside a compiled region must be guarded: switching it recompiles, never goes stale."""
    torch._dynamo.reset()
    q, _, _ = qkv()
    compiled = torch.compile(lambda q: attnpatch.dispatch_attention(q, q, q), fullgraph=True)
    with attnpatch.attention_backend("tag_a"):
        a = compiled(q)
    with attnpatch.attention_backend("tag_c"):
        c = compiled(q)
    assert who_ran(a, q) == 1 and who_ran(c, q) == 3


def test_site_override_applies_without_observers_on_every_path() -> None:
    # A per-site override (verify's fallback action, a plan's rule) must reach calls that would take the fast path
    # or a decision cached before the override was set; removing it restores the selection.
    from attnpatch.core import hooks

    seen: list[str] = []

    def recording(q, k, v, *args):  # type: ignore[no-untyped-def]
        seen.append("rec")
        return registry.get_backend("native").fn(q, k, v, *args)

    registry.register_backend("_rec_override", recording)
    q, k, v = (torch.randn(1, 5, 2, 8) for _ in range(3))
    try:
        for backend in (None, "native", "auto"):
            dispatch.dispatch_attention(q, k, v, backend=backend)  # a decision made (and cached) before
            hooks.set_site_override(hooks.DIRECT, "_rec_override")
            try:
                assert not hooks.observers
                out = dispatch.dispatch_attention(q, k, v, backend=backend)
                assert seen == ["rec"], backend
            finally:
                hooks.set_site_override(hooks.DIRECT, None)
            torch.testing.assert_close(out, dispatch.dispatch_attention(q, k, v, backend="_native_math"))
            dispatch.dispatch_attention(q, k, v, backend=backend)
            assert seen == ["rec"], backend
            seen.clear()
    finally:
        registry.unregister_backend("_rec_override")


@pytest.mark.parametrize("name", ["native", "_native_math", "auto"])
def test_route_bhsd_is_route_in_sdpas_layout(name: str) -> None:
    # route_bhsd takes and returns (batch, heads, seq, head_dim): native gets the tensors untransposed on the fast
    # path, every other call goes through route; either way the answer is route's, bitwise.
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)  # GQA, cross-attention
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[0, :3] = False  # left padding
    additive = torch.randn(1, 1, 7, 9)
    chain = selection.resolve(name)
    for mask, causal in ((None, False), (None, True), (padding, False), (padding, True), (additive, False)):
        expected = dispatch.route(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=causal,
            module_chain=chain,
        ).transpose(1, 2)
        out = dispatch.route_bhsd(q, k, v, attn_mask=mask, is_causal=causal, module_chain=chain)
        assert out.shape == (2, 4, 7, 8)
        assert torch.equal(out, expected), (name, mask is None, causal)
    out, lse = dispatch.route_bhsd(q, k, v, attn_mask=padding, module_chain=chain, return_lse=True)
    expected, expected_lse = dispatch.route(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=padding, module_chain=chain, return_lse=True
    )
    assert torch.equal(out, expected.transpose(1, 2)) and torch.equal(lse, expected_lse)
    assert lse.shape == (2, 7, 4)  # the dispatcher's lse layout either way
