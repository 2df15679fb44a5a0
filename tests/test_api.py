"""attnpatch.apply / unapply / set_attention_backend / install: selection rules and bad input."""

from __future__ import annotations

import copy
import gc
import io
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from attnpatch import api  # noqa: E402
from attnpatch.core import hooks, registry, selection  # noqa: E402
from attnpatch.errors import AttnpatchError, AttnpatchWarning, UnknownBackendError  # noqa: E402
from attnpatch.patchers import MODULE_ATTR, SITE_ATTR  # noqa: E402
from attnpatch.patchers import diffusers as patcher  # noqa: E402
from attnpatch.testing import diffusers_models as dm  # noqa: E402
from attnpatch.testing import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    yield
    for module in list(api._marked):
        api._unmark(module)
    gc.collect()
    api.uninstall()
    assert api.installed_patchers() == []


@contextmanager
def observed() -> Iterator[list[hooks.CallRecord]]:
    records: list[hooks.CallRecord] = []
    hooks.add_observer(records.append)
    try:
        yield records
    finally:
        hooks.remove_observer(records.append)


def marks(model: Any) -> dict[str, str]:
    return {name: m.__dict__[MODULE_ATTR] for name, m in model.named_modules() if MODULE_ATTR in m.__dict__}


@pytest.fixture
def flux() -> Any:
    return dm.build(dm.FAMILIES["flux"])


@pytest.fixture
def pipe() -> Any:
    pytest.importorskip("transformers")
    return tiny.flux_pipeline()


def test_apply_returns_obj_and_marks_every_layer_with_selection_and_site(flux: Any) -> None:
    assert api.apply(flux, "_native_math , native") is flux
    assert marks(flux) == {
        "transformer_blocks.0.attn": "_native_math,native",
        "single_transformer_blocks.0.attn": "_native_math,native",
    }
    assert flux.transformer_blocks[0].attn.__dict__[SITE_ATTR] == "transformer_blocks.0.attn"
    assert api.installed_patchers()[0] == "diffusers"


def test_pipeline_sites_start_with_the_component_name(pipe: Any) -> None:
    api.apply(pipe, "native")
    sites = {
        m.__dict__[SITE_ATTR]
        for _, c in pipe.components.items()
        if isinstance(c, torch.nn.Module)
        for m in c.modules()
        if SITE_ATTR in m.__dict__
    }
    assert "transformer.transformer_blocks.0.attn" in sites
    assert {s.split(".", 1)[0] for s in sites} >= {"transformer", "vae"}


def test_mapping_most_specific_key_wins_then_later_key(flux: Any) -> None:
    api.apply(flux, {"*": "native", "single_transformer_blocks": "_native_math", "*.attn": "flex"})
    # Specificity = non-wildcard characters: "single_transformer_blocks" beats "*.attn", which beats "*".
    assert marks(flux) == {
        "transformer_blocks.0.attn": "flex",
        "single_transformer_blocks.0.attn": "_native_math",
    }
    api.apply(flux, {"transformer_blocks.0.attn": "native", "transformer_blocks.?.attn": "flex"})
    assert marks(flux)["transformer_blocks.0.attn"] == "native"
    api.apply(flux, {"*attn": "native", "*.attn": "_native_math"})  # equally specific: the later key
    assert set(marks(flux).values()) == {"_native_math"}
    api.unapply(flux)
    api.apply(flux, {"*": "native", "single_transformer_blocks.*": "_native_math"})
    assert marks(flux) == {
        "transformer_blocks.0.attn": "native",
        "single_transformer_blocks.0.attn": "_native_math",
    }


def test_mapping_none_leaves_layers_unrouted(pipe: Any) -> None:
    api.apply(pipe, {"*": "native", "vae": None})
    assert marks(pipe.vae) == {}
    assert marks(pipe.transformer)
    api.apply(pipe, {"transformer": None})
    assert marks(pipe.transformer) == {}


def test_unknown_backend_raises_before_anything_changes(flux: Any) -> None:
    with pytest.raises(UnknownBackendError, match="flsh"):
        api.apply(flux, "flsh")
    with pytest.raises(UnknownBackendError, match="did you mean"):
        api.apply(flux, {"transformer_blocks.*": "native", "single_transformer_blocks.*": "sagee"})
    assert marks(flux) == {}
    assert api.installed_patchers() == []


def test_mapping_key_matching_nothing_lists_the_components(pipe: Any) -> None:
    with pytest.raises(AttnpatchError) as info:
        api.apply(pipe, {"transformer": "native", "transfomer": "native"})
    message = str(info.value)
    assert "'transfomer' matches no attention layer" in message
    assert "transformer (2 attention layers)" in message and "vae (2 attention layers)" in message
    assert "tokenizer (0 attention layers)" not in message  # only nn.Module components are listed
    # Never half-applied: the valid key changed nothing either.
    assert marks(pipe.transformer) == {}
    assert api.installed_patchers() == []


@pytest.mark.parametrize("bad", ["a string", 42, None, object()], ids=["str", "int", "None", "object"])
def test_wrong_type_raises_type_error_naming_what_is_accepted(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"DiffusionPipeline.*ModelMixin.*PreTrainedModel.*torch.nn.Module"):
        api.apply(bad, "native")
    with pytest.raises(TypeError, match="apply\\(\\) takes"):
        api.unapply(bad)


def test_wrong_backend_type_raises_type_error(flux: Any) -> None:
    with pytest.raises(TypeError, match="backend must be a name or chain"):
        api.apply(flux, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a backend string or None"):
        api.apply(flux, {"*": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="empty"):
        api.apply(flux, {})


def test_no_attention_warns_with_the_reason() -> None:
    with pytest.warns(
        AttnpatchWarning,
        match="0 attention modules were found in torch.nn.modules.linear.Linear: "
        "it is not, and contains no, diffusers or transformers model",
    ):
        api.apply(torch.nn.Linear(2, 2), "native")
    assert api.installed_patchers() == []


def test_probability_processors_warn_with_their_names() -> None:
    from diffusers.models.attention_processor import AttnProcessor

    unet = dm.build(dm.FAMILIES["unet"])
    unet.set_attn_processor(AttnProcessor())
    with pytest.warns(
        AttnpatchWarning,
        match=r"0 attention modules.*8 diffusers attention layers use processors .*"
        r"\(AttnProcessor\).*unet.set_attn_processor\(AttnProcessor2_0\(\)\)",
    ) as caught:
        api.apply(unet, "native")
    # set_default_attn_processor() is what installs AttnProcessor (diffusers 0.42): never the advice
    assert "set_default_attn_processor() or" not in str(caught[0].message)


def test_applied_model_inside_a_plain_module(flux: Any) -> None:
    wrapper = torch.nn.ModuleDict({"denoiser": flux, "head": torch.nn.Linear(2, 2)})
    api.apply(wrapper, {"denoiser": "native"})
    assert set(marks(wrapper)) == {"denoiser.transformer_blocks.0.attn", "denoiser.single_transformer_blocks.0.attn"}
    with pytest.raises(AttnpatchError, match=r"Components: denoiser \(2 attention layers\), head \(0"):
        api.apply(wrapper, {"decoder": "native"})


def test_set_and_reset_attention_backend_are_per_model(flux: Any) -> None:
    other = dm.build(dm.FAMILIES["flux"])
    api.set_attention_backend(flux, "native")
    api.set_attention_backend(other, "_native_math")
    assert set(marks(flux).values()) == {"native"} and set(marks(other).values()) == {"_native_math"}
    api.reset_attention_backend(flux)
    assert marks(flux) == {} and set(marks(other).values()) == {"_native_math"}
    assert patcher.installed(), "still needed by the other model"
    api.reset_attention_backend(other)
    assert not patcher.installed()


def test_set_attention_backend_rejects_mappings_and_pipelines(flux: Any, pipe: Any) -> None:
    with pytest.raises(TypeError, match=r"use attnpatch\.apply"):
        api.set_attention_backend(flux, {"*": "native"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"for a pipeline use attnpatch\.apply"):
        api.set_attention_backend(pipe, "native")


def test_unapply_of_a_dropped_model_uninstalls_when_the_last_one_goes() -> None:
    flux = dm.build(dm.FAMILIES["flux"])
    api.apply(flux, "native")
    other = dm.build(dm.FAMILIES["flux"])
    api.apply(other, "native")
    del flux
    gc.collect()
    api.unapply(other)
    assert api.installed_patchers() == []


def test_install_validates_and_restores_settings() -> None:
    with pytest.raises(UnknownBackendError):
        api.install("nope")
    assert api.installed_patchers() == []
    api.install("_native_math", strict=True, checks=True)
    assert selection.strict() and selection.checks() and selection.get_default_backend() == "_native_math"
    api.install()  # idempotent; keeps the settings
    assert selection.get_default_backend() == "_native_math"
    api.uninstall()
    api.uninstall()
    assert not selection.strict() and not selection.checks() and selection.get_default_backend() == "native"


def test_install_keeps_applied_selections_after_uninstall(flux: Any) -> None:
    api.apply(flux, "_native_math")
    api.install("native")
    api.uninstall()
    assert set(marks(flux).values()) == {"_native_math"} and patcher.installed()


def test_import_attnpatch_api_imports_no_model_library() -> None:
    import subprocess

    code = "import sys, attnpatch.api; print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_warning_when_something_is_found(flux: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttnpatchWarning)
        api.apply(flux, "native")


# --- issue 11: zero-code activation as good as apply() ---------------------------------------------------------


def _sites_of_a_run(pipe: Any) -> list[str]:
    with observed() as records:
        dm.run_pipeline(pipe)
    return [r.site for r in records]


def test_install_names_every_layer_as_apply_does() -> None:
    pytest.importorskip("transformers")
    pipe = tiny.stable_diffusion_pipeline()
    api.apply(pipe)
    applied = _sites_of_a_run(pipe)
    api.unapply(pipe)
    assert not any(SITE_ATTR in m.__dict__ for m in pipe.unet.modules())

    api.install("native")  # what the runner and ATTNPATCH_BACKEND do: nothing is marked
    installed = _sites_of_a_run(pipe)
    assert installed == applied
    assert "<direct>" not in installed and None not in installed
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1" in installed
    assert {s.split(".", 1)[0] for s in installed} == {"unet", "vae", "text_encoder"}
    # A component called on its own after its pipeline ran is named inside the pipeline, as apply names it.
    for module in pipe.unet.modules():
        module.__dict__.pop(SITE_ATTR, None)
    inputs = dict(
        dm.inputs(dm.FAMILIES["unet"], 0, pipe.unet),
        encoder_hidden_states=torch.randn(2, 7, pipe.unet.config.cross_attention_dim),
    )
    with observed() as records, torch.no_grad():
        pipe.unet(**inputs)
    assert {r.site for r in records} == {s for s in applied if s.startswith("unet.")}


def test_install_names_a_bare_model_as_apply_does(flux: Any) -> None:
    api.apply(flux, "native")
    with observed() as records:
        dm.run(dm.FAMILIES["flux"], flux)
    applied = [r.site for r in records]
    api.unapply(flux)
    api.install("native")
    with observed() as records:
        dm.run(dm.FAMILIES["flux"], flux)
    assert [r.site for r in records] == applied == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]


def test_attention_backend_block_alone_routes_the_models_called_inside(flux: Any) -> None:
    expected = dm.run(dm.FAMILIES["flux"], flux)
    assert api.installed_patchers() == []
    with api.attention_backend("_native_math"), observed() as records:
        out = dm.run(dm.FAMILIES["flux"], flux)
    assert [(r.site, r.served) for r in records] == [
        ("transformer_blocks.0.attn", "_native_math"),
        ("single_transformer_blocks.0.attn", "_native_math"),
    ]
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    with observed() as records:
        assert torch.equal(dm.run(dm.FAMILIES["flux"], flux), expected)
    assert records == [], "outside the block the model runs its own code again"

    @api.attention_backend("_native_math")
    def decorated() -> None:
        dm.run(dm.FAMILIES["flux"], flux)

    with observed() as records:
        decorated()
    assert {r.served for r in records} == {"_native_math"}


def test_the_block_keeps_the_patchers_while_open(flux: Any) -> None:
    other = dm.build(dm.FAMILIES["flux"])
    api.apply(other, "native")
    with api.attention_backend("_native_math"):
        api.unapply(other)  # the last applied model goes, but a block is open: still routed
        with observed() as records:
            dm.run(dm.FAMILIES["flux"], flux)
        assert len(records) == 2


def test_apply_without_a_backend_follows_the_block_then_the_default(flux: Any) -> None:
    api.apply(flux)
    assert set(marks(flux).values()) == {""}
    with observed() as records:
        dm.run(dm.FAMILIES["flux"], flux)
    assert {(r.requested, r.served) for r in records} == {("native", "native")}
    with api.attention_backend("_native_math"), observed() as records:
        dm.run(dm.FAMILIES["flux"], flux)
    assert {(r.requested, r.served) for r in records} == {("_native_math", "_native_math")}
    selection.set_default_backend("_native_math")
    with observed() as records:
        dm.run(dm.FAMILIES["flux"], flux)
    assert {r.served for r in records} == {"_native_math"}


def test_an_explicit_backend_wins_over_the_block(flux: Any) -> None:
    api.apply(flux, "native")  # per-module > context (docs/DESIGN: most specific wins)
    with api.attention_backend("_native_math"), observed() as records:
        dm.run(dm.FAMILIES["flux"], flux)
    assert {r.served for r in records} == {"native"}


def test_a_deepcopy_keeps_routing_after_the_original_is_unapplied(flux: Any) -> None:
    api.apply(flux, "_native_math")
    ema = copy.deepcopy(flux)
    api.unapply(flux)
    with observed() as records:
        dm.run(dm.FAMILIES["flux"], ema)
    assert {r.served for r in records} == {"_native_math"}, "the copy's marks still route it"
    assert len(records) == 2
    api.unapply(ema)
    gc.collect()
    assert api.installed_patchers() == []


def test_a_model_saved_applied_runs_on_native_where_its_backend_is_unknown(flux: Any) -> None:
    native = registry.get_backend("native").fn
    registry.register_backend("test_saved_backend", lambda *args: native(*args), replace=True)
    try:
        api.apply(flux, "test_saved_backend")
        buffer = io.BytesIO()
        torch.save(flux, buffer)
        api.unapply(flux)
    finally:
        registry.unregister_backend("test_saved_backend")
    # Loaded where the backend is not registered (another process, or after unregistering), while another model
    # keeps the patchers installed.
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    api.apply(dm.build(dm.FAMILIES["flux"]), "native")
    expected = dm.run(dm.FAMILIES["flux"], flux)
    unknown = "'test_saved_backend', which this process does not know"
    with pytest.warns(AttnpatchWarning, match=unknown) as caught, observed() as records:
        out = dm.run(dm.FAMILIES["flux"], loaded)
        dm.run(dm.FAMILIES["flux"], loaded)
    assert len([w for w in caught if issubclass(w.category, AttnpatchWarning)]) == 1, "warned once"
    assert {(r.requested, r.served) for r in records} == {("test_saved_backend", "native")}
    assert torch.equal(out, expected)


def test_install_and_blocks_name_transformers_layers_as_apply_does() -> None:
    pytest.importorskip("transformers")
    from attnpatch.testing import transformers_models as tm

    model = tm.llama()
    ids = torch.tensor([[1, 5, 6, 7]])
    api.apply(model)
    with observed() as records, torch.no_grad():
        model(ids)
    applied = [r.site for r in records]
    api.unapply(model)
    assert applied == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    with api.attention_backend("_native_math"), observed() as records, torch.no_grad():
        model(ids)
    assert [(r.site, r.served) for r in records] == [(s, "_native_math") for s in applied]
    for module in model.modules():
        module.__dict__.pop(SITE_ATTR, None)
    api.install("native")
    with observed() as records, torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert {r.site for r in records} == set(applied)


def test_the_public_attention_backend_is_the_one_that_installs_the_patchers() -> None:
    # attnpatch/__init__.py exports api.attention_backend (the lead's change): selection's own class cannot
    # install patchers (core does not import patchers).
    import attnpatch

    assert attnpatch.attention_backend is api.attention_backend
    assert issubclass(api.attention_backend, selection.attention_backend)
