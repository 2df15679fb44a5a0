"""What an attack run found in the engine (issue 11, sections 3-5): errors that cross processes, kernels that raise,
outputs that are wrong, edge shapes that crashed, asyncio contexts, registry misuse. Each test failed before its fix."""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

import attnpatch
from attnpatch.core import registry, selection
from attnpatch.errors import AttnpatchWarning, CheckFailed, UnsupportedCall

MINE = "test_hardening_mine"


def qkv(batch: int = 1, seq: int = 8, heads: int = 2, dim: int = 16) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return tuple(torch.randn(batch, seq, heads, dim) for _ in range(3))


@pytest.fixture
def mine():
    created = []

    def register(fn, **caps):
        registry.register_backend(MINE, fn, replace=True, **caps)
        created.append(MINE)

    yield register
    for name in created:
        if name in {b.name for b in registry.list_backends()}:
            registry.unregister_backend(name)


# ----- errors that cross processes ------------------------------------------------------------------------------


def test_unsupported_call_survives_pickling() -> None:
    error = UnsupportedCall("no backend of 'flash' can serve this call", {"flash": ["needs a CUDA GPU"]})
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is UnsupportedCall and str(copy) == str(error) and copy.reasons == error.reasons


def _strict_refusal_in_worker(_: int) -> None:
    import torch

    import attnpatch

    attnpatch.set_strict(True)
    q = torch.randn(1, 4, 2, 8)
    attnpatch.dispatch_attention(q, q, q, backend="flash")  # no GPU here: refused


def test_strict_refusal_in_a_spawned_pool_worker_reaches_the_parent() -> None:
    # Before: UnsupportedCall(message, reasons) could not be unpickled, the pool's result thread died and the
    # parent waited forever. Now the parent gets the error, in seconds.
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        result = pool.map_async(_strict_refusal_in_worker, [0])
        with pytest.raises(UnsupportedCall, match="flash"):
            result.get(timeout=120)


# ----- a backend that raises ------------------------------------------------------------------------------------


def _raises(*args: object) -> torch.Tensor:
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_backend_that_raises_falls_back_with_one_warning(mine) -> None:
    mine(_raises)
    q, k, v = qkv()
    with pytest.warns(AttnpatchWarning, match=f"{MINE}.*raised RuntimeError: CUDA error: an illegal memory access"):
        out = attnpatch.dispatch_attention(q, k, v, backend=MINE)
    torch.testing.assert_close(out, attnpatch.dispatch_attention(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnpatch.dispatch_attention(q, k, v, backend=MINE)  # said once
    assert any(key[1] == MINE and "raised RuntimeError" in key[3] for key in attnpatch.fallback_counts())


def test_strict_mode_raises_the_kernel_error_naming_the_backend(mine) -> None:
    mine(_raises)
    attnpatch.set_strict(True)
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="illegal memory access") as raised:
        attnpatch.dispatch_attention(q, k, v, backend=MINE)
    if sys.version_info >= (3, 11):
        assert any(MINE in note for note in raised.value.__notes__)


def test_checks_check_the_output(mine) -> None:
    mine(lambda q, k, v, *rest: q[:, :1])  # wrong shape
    attnpatch.set_checks(True)
    q, k, v = qkv()
    with pytest.raises(
        CheckFailed, match=rf"backend '{MINE}' returned shape \(1, 1, 2, 16\), expected \(1, 8, 2, 16\)"
    ):
        attnpatch.dispatch_attention(q, k, v, backend=MINE)
    mine(lambda q, k, v, *rest: q.double())
    with pytest.raises(CheckFailed, match=r"returned torch\.float64"):
        attnpatch.dispatch_attention(q, k, v, backend=MINE)


# ----- edge shapes ----------------------------------------------------------------------------------------------


def test_flex_with_no_keys_does_not_kill_the_interpreter() -> None:
    # Before: "Fatal Python error: Floating point exception" inside flex's compiled kernel. In a child, so that a
    # regression fails this test instead of ending the test run.
    code = (
        "import torch, attnpatch\n"
        "attnpatch.set_strict(True)\n"
        "q = torch.randn(1, 4, 2, 8)\n"
        "empty = torch.randn(1, 0, 2, 8)\n"
        "print(float(attnpatch.dispatch_attention(q, empty, empty, backend='flex').abs().sum()))\n"
        "z = torch.randn(0, 4, 2, 8)\n"
        "print(tuple(attnpatch.dispatch_attention(z, z, z, attn_mask=torch.ones(0, 4, dtype=torch.bool), "
        "backend='flex').shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0.0", "(0,", "4,", "2,", "8)"]


def test_flex_refuses_backward_on_cpu() -> None:
    q, k, v = (t.requires_grad_() for t in qkv())
    reasons = registry.get_backend("flex").call_reasons(
        attnpatch.core.call.CallSpec.of(q, k, v, "none", 0.0, False, None)
    )
    assert reasons == ["FlexAttention has no backward pass on CPU (inputs require grad)"]
    with pytest.warns(AttnpatchWarning, match="no backward pass on CPU"):
        attnpatch.dispatch_attention(q, k, v, backend="flex").sum().backward()
    assert q.grad is not None


def test_native_flash_falls_back_instead_of_no_available_kernel() -> None:
    q, k, _ = qkv()
    v = torch.randn(1, 8, 2, 8)  # head_dim_v != head_dim (DeepSeek-V3 attention)
    with pytest.warns(AttnpatchWarning, match="value head_dim 8 != query head_dim 16"):
        out = attnpatch.dispatch_attention(q, k, v, backend="_native_flash")
    assert out.shape == (1, 8, 2, 8)
    strided = torch.randn(1, 8, 16, 2).transpose(-1, -2)  # head dim not contiguous
    attnpatch.set_strict(True)
    torch.testing.assert_close(
        attnpatch.dispatch_attention(strided, strided, strided, backend="_native_flash"),
        attnpatch.dispatch_attention(strided, strided, strided),
    )


def test_a_mask_that_is_not_a_tensor_is_one_line() -> None:
    q, k, v = qkv()
    with pytest.raises(CheckFailed, match=r"attn_mask is a list, not a tensor: pass a torch\.Tensor") as raised:
        attnpatch.dispatch_attention(q, k, v, attn_mask=[[True] * 8])
    assert "\n" not in str(raised.value)


# ----- selection state ------------------------------------------------------------------------------------------


def test_contexts_of_interleaved_asyncio_tasks_do_not_leak() -> None:
    seen: dict[str, list[str]] = {"a": [], "b": []}

    async def task(name: str, backend: str, first: asyncio.Event, second: asyncio.Event) -> None:
        with attnpatch.attention_backend(backend):
            seen[name].append(attnpatch.current_backend())
            first.set()
            await second.wait()
            seen[name].append(attnpatch.current_backend())

    async def main() -> None:
        a_in, b_in = asyncio.Event(), asyncio.Event()
        await asyncio.gather(task("a", "_native_math", a_in, b_in), task("b", "native", b_in, a_in))

    asyncio.run(main())
    assert seen == {"a": ["_native_math", "_native_math"], "b": ["native", "native"]}
    assert attnpatch.current_backend() == "native" and selection.open_contexts() == 0


def test_a_compiled_function_reads_a_context_opened_outside() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q, k, v = qkv()
    compiled = torch.compile(lambda q, k, v: attnpatch.dispatch_attention(q, k, v, is_causal=True), fullgraph=True)
    with attnpatch.attention_backend("_native_math"):
        out = compiled(q, k, v)
    assert sum(counters["graph_break"].values()) == 0
    torch.testing.assert_close(out, attnpatch.dispatch_attention(q, k, v, is_causal=True))


def test_unregistering_the_default_backend_goes_back_to_native(mine) -> None:
    mine(lambda q, k, v, *rest: q)
    attnpatch.set_default_backend(MINE)
    with pytest.warns(AttnpatchWarning, match=f"default backend '{MINE}' is no longer registered"):
        registry.unregister_backend(MINE)
    assert attnpatch.get_default_backend() == "native"
    q, k, v = qkv()
    attnpatch.dispatch_attention(q, k, v)  # no UnknownBackendError
    registry.register_backend(MINE, lambda q, k, v, *rest: q)  # registering works again


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "non-empty string"),
        ({"name": "a,b"}, "without commas"),
        ({"devices": "cpu"}, r"devices must be a set of str values, e\.g\. devices=\{'cuda'\}"),
        ({"dtypes": {"float16"}}, "dtypes must be a set of dtype values"),
    ],
)
def test_register_backend_validates_its_arguments(kwargs: dict[str, object], match: str) -> None:
    name = kwargs.pop("name", MINE)
    with pytest.raises((ValueError, TypeError), match=match):
        registry.register_backend(name, lambda q, k, v, *rest: q, **kwargs)  # type: ignore[arg-type]
    assert MINE not in {b.name for b in registry.list_backends()}


def test_routing_memory_is_bounded_over_many_shapes(mine) -> None:
    # A fallback chain whose refusal names the shape (as real kernels' do): 20,000 distinct (seq_q, seq_kv) calls
    # must not grow the reason cache, the fallback counts or the warnings without bound (before: +10.8 MB).
    import tracemalloc

    mine(lambda q, k, v, *rest: q, cross=False)  # "needs seq_q == seq_kv, got X != Y"
    q = torch.randn(1, 300, 1, 4)
    kv = torch.randn(1, 300, 1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seq_q in range(1, 200):  # warm up: caches fill to their bounds
            attnpatch.dispatch_attention(q[:, :seq_q], kv[:, :2], kv[:, :2], backend=MINE)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        shown = 0
        for i in range(20_000):
            seq_q, seq_kv = 1 + i % 100, 2 + i // 100
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                attnpatch.dispatch_attention(q[:, :seq_q], kv[:, :seq_kv], kv[:, :seq_kv], backend=MINE)
            shown += len(caught)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 3 * 2**20, f"routing state grew by {grown / 2**20:.1f} MiB over 20,000 shapes"
    assert shown == 0, "warnings for one backend are capped (the report counts every fallback)"
    assert len(attnpatch.fallback_counts()) <= 1024 + 1


def test_routing_allocates_nothing_per_call_once_warm(mine) -> None:
    # Issue 13: no per-call allocation by routing beyond the kernel's own, on every path (tracemalloc over 10,000
    # calls of each, after a warm-up; the outputs are dropped at once).
    import tracemalloc

    mine(lambda *args: args[0], devices={"nowhere"})  # refuses every call: the first member of a fallback chain
    q, k, v = qkv()
    padding = torch.ones(1, 8, dtype=torch.bool)
    bool_4d = torch.ones(8, 8, dtype=torch.bool).tril().view(1, 1, 8, 8)
    additive = torch.zeros(1, 1, 8, 8)
    calls = {
        "no mask": lambda: attnpatch.dispatch_attention(q, k, v),
        "key padding": lambda: attnpatch.dispatch_attention(q, k, v, attn_mask=padding),
        "4-D bool": lambda: attnpatch.dispatch_attention(q, k, v, attn_mask=bool_4d),
        "additive": lambda: attnpatch.dispatch_attention(q, k, v, attn_mask=additive),
        "auto": lambda: attnpatch.dispatch_attention(q, k, v, backend="auto"),
        "fallback chain": lambda: attnpatch.dispatch_attention(q, k, v, backend=f"{MINE},native"),
    }
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, call in calls.items():
            for _ in range(200):
                call()
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            for _ in range(10_000):
                call()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
            assert grown < 32 * 1024, f"{name}: routing state grew by {grown} bytes over 10,000 calls"
