"""attnpatch.apply / unapply / set_attention_backend / install: selection rules and bad input."""

from __future__ import annotations

import gc
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import diffusers_models as dm  # noqa: E402

from attnpatch import api  # noqa: E402
from attnpatch.core import selection  # noqa: E402
from attnpatch.errors import AttnpatchError, AttnpatchWarning, UnknownBackendError  # noqa: E402
from attnpatch.patchers import MODULE_ATTR, SITE_ATTR  # noqa: E402
from attnpatch.patchers import diffusers as patcher  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    yield
    for module in list(api._marked):
        api._unmark(module)
    api.uninstall()
    gc.collect()
    assert api.installed_patchers() == []


def marks(model: Any) -> dict[str, str]:
    return {name: m.__dict__[MODULE_ATTR] for name, m in model.named_modules() if MODULE_ATTR in m.__dict__}


@pytest.fixture
def flux() -> Any:
    return dm.build(dm.FAMILIES["flux"])


@pytest.fixture
def pipe() -> Any:
    pytest.importorskip("transformers")
    return dm.flux_pipeline()


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
        r"\(AttnProcessor\)",
    ):
        api.apply(unet, "native")


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
