"""The diffusers patcher on real tiny models: every softmax attention call reaches the dispatcher, outputs stay
exact with `native`, and unapply leaves diffusers and torch exactly as they were."""

from __future__ import annotations

import copy
import gc
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import diffusers  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnpatch import api  # noqa: E402
from attnpatch.core import dispatch, hooks, registry, selection  # noqa: E402
from attnpatch.patchers import MODULE_ATTR, SITE_ATTR, state  # noqa: E402
from attnpatch.patchers import diffusers as patcher  # noqa: E402
from attnpatch.testing import diffusers_models as dm  # noqa: E402
from attnpatch.testing import tiny  # noqa: E402

ORIGINAL_SDPA = F.scaled_dot_product_attention
HAS_DISPATCHER = hasattr(diffusers.models, "attention_dispatch") or "diffusers.models.attention_dispatch" in sys.modules
try:
    import diffusers.models.attention_dispatch as attention_dispatch

    ORIGINAL_DISPATCH = attention_dispatch.dispatch_attention_fn
except ImportError:  # diffusers < 0.35: the legacy path only
    attention_dispatch = None
    ORIGINAL_DISPATCH = None


@contextmanager
def observed() -> Iterator[list[hooks.CallRecord]]:
    records: list[hooks.CallRecord] = []
    hooks.add_observer(records.append)
    try:
        yield records
    finally:
        hooks.remove_observer(records.append)


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    yield
    for module in list(api._marked):
        api._unmark(module)
    gc.collect()
    api.uninstall()
    dispatch.reset_fallbacks()
    assert api.installed_patchers() == []


def assert_no_wrappers() -> None:
    """torch and diffusers hold their own functions again: nothing of ours is left anywhere."""
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA
    assert not patcher.installed()
    for name, module in list(sys.modules.items()):
        if module is None:
            continue
        namespace = getattr(module, "__dict__", {})
        if ORIGINAL_DISPATCH is not None and "dispatch_attention_fn" in namespace:
            assert not getattr(namespace["dispatch_attention_fn"], "_attnpatch_dispatch", False), name
        if not name.startswith("diffusers."):
            continue
        for value in list(namespace.values()):
            if isinstance(value, type):
                assert not hasattr(value.__dict__.get("__call__"), "_attnpatch_kind"), value
                assert not hasattr(value.__dict__.get("__call__"), "_attnpatch_skipped"), value
                assert not hasattr(value.__dict__.get("set_processor"), "_attnpatch_setter"), value


def family(name: str) -> dm.Family:
    fam = dm.FAMILIES[name]
    reason = dm.missing_reason(fam)
    if reason:
        pytest.skip(reason)
    return fam


# --- every family -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(dm.FAMILIES))
def test_every_softmax_attention_call_reaches_the_dispatcher(name: str) -> None:
    fam = family(name)
    model = dm.build(fam)
    with dm.SdpaCounter() as counter:
        expected = dm.run(fam, model)
    layers = patcher.attention_modules(model)
    assert counter.calls > 0 and layers

    api.apply(model, "native")
    with observed() as records:
        out = dm.run(fam, model)
    # Each attention layer runs once per forward here, so layers x 1 call = every SDPA call the model makes.
    assert len(records) == counter.calls == len(layers)
    assert {r.site for r in records} == {layer_name for layer_name, _ in layers}
    assert {r.served for r in records} == {"native"}
    assert dispatch.passthrough_counts() == {}
    assert torch.equal(out, expected), "native must give the unpatched model's exact output"

    api.apply(model, "_native_math")
    with observed() as records:
        out = dm.run(fam, model)
    assert {r.served for r in records} == {"_native_math"}
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)

    api.unapply(model)
    assert_no_wrappers()
    assert not any(MODULE_ATTR in m.__dict__ or SITE_ATTR in m.__dict__ for m in model.modules())
    assert torch.equal(dm.run(fam, model), expected)


def test_linear_and_probability_processors_are_left_alone() -> None:
    model = dm.build(family("sana"))
    assert [cls for _, cls in patcher.skipped_modules(model)] == ["SanaLinearAttnProcessor2_0"]
    from diffusers.models.attention_processor import AttnProcessor

    unet = dm.build(family("unet"))
    unet.set_attn_processor(AttnProcessor())  # bmm + softmax: the probabilities are computed in the processor
    assert patcher.attention_modules(unet) == []
    assert {cls for _, cls in patcher.skipped_modules(unet)} == {"AttnProcessor"}


def test_layers_left_alone_are_counted_with_their_reason_while_routed() -> None:
    from diffusers.models.attention_processor import AttnProcessor

    fam = family("unet")
    unet = dm.build(fam)
    unet.set_attn_processor(AttnProcessor())
    expected = dm.run(fam, unet)
    api.install("native")
    assert AttnProcessor.__dict__["__call__"]._attnpatch_skipped.startswith(patcher.SKIPPED)
    with observed() as records:
        out = dm.run(fam, unet)
    assert records == [] and torch.equal(out, expected), "left alone: the library's own code, unchanged"
    counts = dispatch.passthrough_counts()
    assert {site for site, _ in counts} == {name for name, _ in patcher.skipped_modules(unet)}
    [reason] = {reason for _, reason in counts}
    assert "AttnProcessor computes the attention probabilities itself" in reason and "AttnProcessor2_0()" in reason
    api.uninstall()
    assert_no_wrappers()
    dispatch.reset_fallbacks()
    dm.run(fam, unet)
    assert dispatch.passthrough_counts() == {}, "not counted once nothing is routed"

    sana = dm.build(family("sana"))
    api.install("native")
    dm.run(dm.FAMILIES["sana"], sana)
    linear = {reason for _, reason in dispatch.passthrough_counts()}
    assert linear == {f"{patcher.SKIPPED}SanaLinearAttnProcessor2_0 calls no softmax attention function (linear or "
                      "custom attention)"}  # fmt: skip


# --- pipelines ----------------------------------------------------------------------------------------------


def _transformers_patcher() -> None:
    try:
        import attnpatch.patchers.transformers  # noqa: F401
    except ModuleNotFoundError as exc:
        pytest.skip(f"the transformers patcher is not there: {exc}")


@pytest.mark.parametrize(
    "builder, denoiser",
    [(tiny.stable_diffusion_pipeline, "unet"), (tiny.flux_pipeline, "transformer")],
    ids=["stable_diffusion", "flux"],
)
def test_full_pipeline_routes_every_component(builder: Any, denoiser: str) -> None:
    _transformers_patcher()
    pipe = builder()
    with dm.SdpaCounter() as counter:
        expected = dm.run_pipeline(pipe)
    api.apply(pipe, "native")
    with observed() as records:
        out = dm.run_pipeline(pipe)
    assert torch.equal(out, expected)
    assert len(records) == counter.calls, "some attention calls of the pipeline did not reach the dispatcher"
    components = {r.site.split(".", 1)[0] for r in records}
    # Text encoders whose attention the transformers patcher reaches (T5 on transformers 4.46 computes it inline).
    marked = {
        name
        for name, c in pipe.components.items()
        if isinstance(c, torch.nn.Module) and any(SITE_ATTR in m.__dict__ for m in c.modules())
    }
    assert components == marked and {denoiser, "vae", "text_encoder"} <= components
    text_encoders = marked - {denoiser, "vae"}

    # Per component: the denoiser on one backend, text encoders on another, the VAE left unrouted.
    api.unapply(pipe)
    api.apply(pipe, {denoiser: "_native_math", "text_encoder*": "native", "vae": None})
    with dm.SdpaCounter() as counter, observed() as records:
        out = dm.run_pipeline(pipe)
    served = {(r.site.split(".", 1)[0], r.served) for r in records}
    assert served == {(denoiser, "_native_math"), *((t, "native") for t in text_encoders)}
    vae_calls = counter.calls - len(records)
    assert vae_calls > 0, "the VAE's attention must have run, unrouted"
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)

    api.unapply(pipe)
    assert_no_wrappers()
    assert torch.equal(dm.run_pipeline(pipe), expected)


# --- reversible, idempotent, no leaks -----------------------------------------------------------------------


def test_apply_twice_wraps_once() -> None:
    fam = family("unet")
    model = dm.build(fam)
    api.apply(model, "native")
    calls_after_one = patcher.PATCHER.patches.entries()
    api.apply(model, "native")
    patcher.install()
    assert patcher.PATCHER.patches.entries() == calls_after_one
    processor_class = type(model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor)
    wrapper = processor_class.__dict__["__call__"]
    assert wrapper._attnpatch_kind == patcher.SDPA
    assert not hasattr(wrapper.__wrapped__, "_attnpatch_kind"), "the wrapper wraps the original, not itself"
    with observed() as records:
        dm.run(fam, model)
    assert len(records) == len(patcher.attention_modules(model))


def _spy_backends(log: list[tuple[str, int]], threads: bool = True) -> None:
    # Two backends that run `native` and log (their name, the calling thread). Dynamo cannot trace
    # threading.get_ident, so compiled tests log 0 for the thread.
    native = registry.get_backend("native").fn

    def spy(name: str) -> Any:
        def fn(*args: Any) -> torch.Tensor:
            log.append((name, threading.get_ident() if threads else 0))
            return native(*args)

        return fn

    registry.register_backend("spy_a", spy("spy_a"), replace=True)
    registry.register_backend("spy_b", spy("spy_b"), replace=True)


def test_two_models_two_backends_two_threads_do_not_leak() -> None:
    fam = family("flux")
    log: list[tuple[str, int]] = []
    _spy_backends(log)
    try:
        model_a, model_b = dm.build(fam), dm.build(fam)
        api.apply(model_a, "spy_a")
        attnpatch_set = api.set_attention_backend
        attnpatch_set(model_b, "spy_b")
        idents: dict[str, int] = {}
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def work(tag: str, model: Any) -> None:
            try:
                idents[tag] = threading.get_ident()
                barrier.wait()
                for _ in range(10):
                    dm.run(fam, model)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t, m)) for t, m in (("spy_a", model_a), ("spy_b", model_b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        layers = len(patcher.attention_modules(model_a))
        for tag in ("spy_a", "spy_b"):
            calls = [ident for name, ident in log if name == tag]
            assert len(calls) == 10 * layers
            assert set(calls) == {idents[tag]}, f"{tag} served a call of the other model's thread"

        api.reset_attention_backend(model_b)
        log.clear()
        dm.run(fam, model_b)
        assert log == []
        dm.run(fam, model_a)
        assert {name for name, _ in log} == {"spy_a"}
    finally:
        registry.unregister_backend("spy_a")
        registry.unregister_backend("spy_b")


@pytest.mark.parametrize("name", ["unet", "flux"])
def test_state_dict_save_load_deepcopy_pickle(name: str, tmp_path: Any) -> None:
    fam = family(name)
    model = dm.build(fam)
    expected = dm.run(fam, model)
    keys = list(model.state_dict())
    api.apply(model, "native")
    assert list(model.state_dict()) == keys

    model.save_pretrained(tmp_path)
    assert "attnpatch" not in (tmp_path / "config.json").read_text()
    loaded = type(model).from_pretrained(tmp_path).eval()
    # Not bitwise: a reloaded Flux differs by ~2e-7 from the one it was saved from, with or without attnpatch.
    torch.testing.assert_close(dm.run(fam, loaded), expected, atol=1e-6, rtol=1e-6)

    layers = len(patcher.attention_modules(model))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert list(clone.state_dict()) == keys
        with observed() as records:
            out = dm.run(fam, clone)
        assert len(records) == layers, "a copy of an applied model keeps its selection"
        assert torch.equal(out, expected)
        api.unapply(clone)


@pytest.mark.parametrize("name", ["unet", "flux"])
def test_fuse_qkv_projections_after_apply(name: str) -> None:
    fam = family(name)
    model = dm.build(fam)
    if not hasattr(model, "fuse_qkv_projections"):
        pytest.skip(f"diffusers {diffusers.__version__}: {type(model).__name__} has no fuse_qkv_projections")
    expected = dm.run(fam, model)
    api.apply(model, "native")
    model.fuse_qkv_projections()
    layers = patcher.attention_modules(model)
    with observed() as records:
        out = dm.run(fam, model)
    assert len(records) == len(layers) > 0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    model.unfuse_qkv_projections()
    with observed() as records:
        dm.run(fam, model)
    assert len(records) == len(layers)


class UserProcessor:
    """A processor class of the user's own, defined after apply; calls F.scaled_dot_product_attention."""

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, **kwargs: Any) -> Any:
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q, k, v = (t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


def test_processor_swaps_after_apply_keep_routing() -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    fam = family("unet")
    model = dm.build(fam)
    expected = dm.run(fam, model)
    api.apply(model, "native")
    layers = len(patcher.attention_modules(model))

    model.set_attn_processor(AttnProcessor2_0())  # new instances, as LoRA / IP-Adapter loading does
    with observed() as records:
        assert torch.equal(dm.run(fam, model), expected)
    assert len(records) == layers

    model.set_attn_processor(UserProcessor())  # a class attnpatch has never seen, set through set_processor
    with observed() as records:
        dm.run(fam, model)
    assert len(records) == layers

    attn = model.mid_block.attentions[0].transformer_blocks[0].attn1
    model.set_attn_processor(AttnProcessor())  # bmm + softmax: left alone, nothing routed
    attn.processor = AttnProcessor2_0()  # assigned directly, as PAG does
    with observed() as records:
        out = dm.run(fam, model)
    assert [r.site for r in records] == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# --- torch.compile ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux", "unet"])
def test_compile_fullgraph_has_no_graph_breaks(name: str) -> None:
    from torch._dynamo.utils import counters

    fam = family(name)
    model = dm.build(fam)
    expected = dm.run(fam, model)
    log: list[tuple[str, int]] = []
    _spy_backends(log, threads=False)
    try:
        api.apply(model, "spy_a")
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad():
            out = fam.output(compiled(**dm.inputs(fam, 0, model)))
        assert dict(counters["graph_break"]) == {}
        assert len(log) == len(patcher.attention_modules(model)), "the compiled model must still route"
        assert torch.equal(out, expected)
    finally:
        torch._dynamo.reset()
        registry.unregister_backend("spy_a")
        registry.unregister_backend("spy_b")


# --- passthrough --------------------------------------------------------------------------------------------


needs_dispatcher = pytest.mark.skipif(attention_dispatch is None, reason="diffusers < 0.35 has no dispatcher")


@needs_dispatcher
def test_backend_hard_coded_by_diffusers_passes_through() -> None:
    fam = family("flux")
    model = dm.build(fam)
    expected = dm.run(fam, model)
    api.apply(model, "native")
    model.set_attention_backend("native")  # diffusers' own setting: the processors now name a backend
    with observed() as records:
        assert torch.equal(dm.run(fam, model), expected)
    assert records == []
    reasons = {reason for (_, reason) in dispatch.passthrough_counts()}
    assert any("hard-codes diffusers backend 'native'" in r for r in reasons), reasons


def _outcome(fn: Any, *args: Any, **kwargs: Any) -> Any:
    # What a call returns, or the type of exception it raises: a passed-through call must do exactly what
    # diffusers' own function does with the same arguments, whatever that is in this version.
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        return type(exc)


@needs_dispatcher
def test_return_lse_on_a_hard_coded_backend_and_block_mask_pass_through_to_diffusers() -> None:
    # return_lse itself is routed since #12 (tests/patchers/test_diffusers_parallel.py); a processor that
    # hard-codes a diffusers backend still gets diffusers' own function, return_lse or not.
    from torch.nn.attention.flex_attention import create_block_mask

    q = torch.randn(1, 16, 2, 8)
    block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, 16, 16, device="cpu")
    api.install("native")
    for kwargs, reason in (
        ({"attention_kwargs": {"return_lse": True}, "backend": "native"}, "hard-codes diffusers backend 'native'"),
        ({"attn_mask": block_mask}, "BlockMask"),
    ):
        dispatch.reset_fallbacks()
        with observed() as records:
            got = _outcome(attention_dispatch.dispatch_attention_fn, q, q, q, **kwargs)
        expected = _outcome(ORIGINAL_DISPATCH, q, q, q, **kwargs)
        assert records == []
        assert any(reason in r for (_, r) in dispatch.passthrough_counts()), dispatch.passthrough_counts()
        if isinstance(expected, torch.Tensor):
            assert torch.equal(got, expected)
        else:
            assert got is expected

    # A parallel_config is decided by _diffusers_parallel.parallel_reason (test_diffusers_parallel.py).
    assert patcher._dispatch_passthrough_reason(None, None, {"parallel_config": object()}) is None
    assert patcher._dispatch_passthrough_reason({"return_lse": False}, None, {}) is None


def test_sdpa_redirect_is_scoped_to_routed_processor_calls() -> None:
    q = torch.randn(1, 2, 16, 8)
    model = dm.build(family("vae"))
    api.apply(model, "native")
    with observed() as records:
        F.scaled_dot_product_attention(q, q, q)  # outside any processor call: torch's own SDPA, not routed
    assert records == []
    assert F.scaled_dot_product_attention is not ORIGINAL_SDPA  # the redirect is in place while applied
    api.unapply(model)
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA


# --- process-wide install -----------------------------------------------------------------------------------


def test_install_routes_models_created_later_and_uninstall_restores() -> None:
    fam = family("flux")
    before = dm.run(fam, dm.build(fam))
    api.install("_native_math")
    assert state.route_all and selection.get_default_backend() == "_native_math"
    model = dm.build(fam)  # created after install, never applied
    with observed() as records:
        out = dm.run(fam, model)
    assert len(records) == 2 and {r.served for r in records} == {"_native_math"}
    torch.testing.assert_close(out, before, atol=1e-4, rtol=1e-4)
    api.uninstall()
    assert not state.route_all and selection.get_default_backend() == "native"
    assert_no_wrappers()
    assert torch.equal(dm.run(fam, model), before)


def test_attnpatch_disable_makes_install_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNPATCH_DISABLE", "1")
    api.install("native")
    assert not state.route_all and api.installed_patchers() == []
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA


def test_install_before_diffusers_is_imported_patches_by_import_hook() -> None:
    # In a fresh interpreter: the post-import hooks must catch diffusers loading after install().
    code = (
        "import sys, attnpatch.api as api, attnpatch.core.hooks as d\n"
        "api.install('native')\n"
        "assert 'diffusers' not in sys.modules\n"
        "from attnpatch.testing import diffusers_models as dm\n"
        "records = []\n"
        "d.add_observer(records.append)\n"
        "for name in ('flux', 'unet'):\n"
        "    fam = dm.FAMILIES[name]\n"
        "    dm.run(fam, dm.build(fam))\n"
        "print(len(records))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), *sys.path]))
    env.pop("ATTNPATCH_DISABLE", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "10"  # flux 2 + unet 8 attention calls


@pytest.mark.parametrize("backend", ["native", "_native_math"])  # run as written; routed through the redirect
def test_a_model_compiled_before_an_eager_routed_call_does_not_recompile(backend: str) -> None:
    # A compiled UNet beside an eager VAE: the eager call writes the thread's scope and fills the layer scope's
    # cache; neither may invalidate what the first trace guarded on.
    fam = family("unet")
    model = dm.build(fam)
    api.apply(model, backend)
    inputs = dm.inputs(fam, 0, model)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad():
            expected = fam.output(compiled(**inputs))
            model(**inputs)
            with torch.compiler.set_stance("fail_on_recompile"):
                torch.testing.assert_close(fam.output(compiled(**inputs)), expected, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()
