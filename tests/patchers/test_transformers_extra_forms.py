"""Issue 12, implementations: models loaded with attn_implementation="flash_attention_2", a "kernels-community/..."
flash kernel from the Hub, or "flex_attention" are routed when a backend is selected, each call read in the mask form
transformers builds for that implementation (flash: a 2-D key-padding mask or none, packed sequences by position_ids
or cu_seq_lens; flex: a BlockMask).

What can run here and what cannot: flash-attn does not install on this CPU machine and transformers then loads the
Hub kernel kernels-community/flash-attn2 (a CUDA build), so transformers' own flash path never runs here. The flash
tests therefore run a model under the name "flash_attention_2" set on its config (transformers reads it at every call
to pick the mask function and the attention function; only loading checks the package) and compare the routed
result with the same weights run unpatched on sdpa or eager, on the real (non-padding) positions: flash's padded
query rows are zeros, sdpa's are not. The Hub test registers the kernel with transformers' own
load_and_register_attn_kernel, the download replaced by a module whose kernel raises if ever called. flex_attention
runs on CPU (torch.compile builds its BlockMask and kernel): there the routed result is compared with flex's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any
from unittest import mock

import pytest
import torch

pytest.importorskip("transformers")

from attnpatch import api
from attnpatch.core import dispatch, hooks
from attnpatch.core.hooks import CallRecord
from attnpatch.patchers import _transformers_forms as forms
from attnpatch.testing import transformers_extra as xm

TOLERANCE = 2e-4
FAMILIES = dict(xm.FAMILIES, llama=xm.llama)
NATIVE_IMPLEMENTATION = {"gemma2": "eager", "gpt_oss": "eager"}  # they refuse sdpa
# transformers builds one mask form per implementation from 4.53 (masking_utils); before, each model built its own.
pytestmark = pytest.mark.skipif(
    xm.VERSION < (4, 53), reason="flash and flex forms are tested from 4.53 (masking_utils)"
)


@contextmanager
def recorded() -> Iterator[list[CallRecord]]:
    records: list[CallRecord] = []
    hooks.add_observer(records.append)
    try:
        yield records
    finally:
        hooks.remove_observer(records.append)


def build(family: str) -> torch.nn.Module:
    return xm.build_or_skip(FAMILIES[family], NATIVE_IMPLEMENTATION.get(family, "sdpa"))


def forward(model: torch.nn.Module, **inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or xm.left_padded())).logits


def routed(model: torch.nn.Module, name: str, **inputs: Any) -> tuple[torch.Tensor, list[CallRecord]]:
    api.apply(model, backend="native")
    try:
        with recorded() as records, xm.implementation(model, name):
            return forward(model, **inputs), records
    finally:
        api.unapply(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_flash_form_is_routed_and_matches_unpatched(family: str) -> None:
    model = build(family)
    expected = forward(model)
    got, records = routed(model, "flash_attention_2")
    assert dispatch.passthrough_counts() == {}
    assert [r.site for r in records] == xm.LAYERS
    real = xm.left_padded()["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=TOLERANCE, rtol=0)


def assert_flash_decode_matches_unpatched(model: Any, inputs: dict[str, Any], **options: Any) -> None:
    """Greedy decode of 6 tokens unpatched, then routed under attn_implementation="flash_attention_2": every call
    routed (2 layers x 6 steps), the same tokens, scores within TOLERANCE."""

    def generate() -> Any:
        with torch.no_grad():
            return model.generate(
                **inputs,
                max_new_tokens=6,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
                **options,
            )

    unpatched = generate()
    api.apply(model, backend="native")
    try:
        with recorded() as records, xm.implementation(model, "flash_attention_2"):
            ours = generate()
    finally:
        api.unapply(model)
    assert dispatch.passthrough_counts() == {} and len(records) == 2 * 6
    assert torch.equal(ours.sequences, unpatched.sequences)
    for a, b in zip(ours.scores, unpatched.scores, strict=True):
        torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_flash_form_greedy_decode_matches_unpatched(family: str) -> None:
    assert_flash_decode_matches_unpatched(build(family), xm.left_padded())


@pytest.mark.parametrize(
    ("padded", "cache"), [(False, "dynamic"), (True, "static")], ids=["unpadded-dynamic", "padded-static"]
)
def test_flash_form_decode_without_padding_or_with_a_static_cache(padded: bool, cache: str) -> None:
    # Unpadded, flash gets no mask at all: the prefill is causal with window=(3, 0) given to the dispatcher, each
    # decode step one query over every cached key, aligned bottom-right. A static cache hands flash a 2-D mask
    # shorter than the cache: the keys past it are cut, as flash does.
    model = build("mistral")
    inputs = xm.left_padded() if padded else {"input_ids": xm.left_padded()["input_ids"][1:]}
    assert_flash_decode_matches_unpatched(model, inputs, cache_implementation=cache)


def _packed() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    # Two sequences of 5 and 7 tokens laid end to end in one row, as padding-free training packs them.
    first, second = torch.tensor([3, 4, 5, 6, 7]), torch.tensor([9, 10, 11, 12, 13, 14, 15])
    ids = torch.cat([first, second]).unsqueeze(0)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    return [first, second], ids, positions


def _separately(model: torch.nn.Module, sequences: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([forward(model, input_ids=s.unsqueeze(0)) for s in sequences], dim=1)


@pytest.mark.parametrize("given", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_flash_form_packed_sequences_attend_within_their_own_sequence(family: str, given: str) -> None:
    model = build(family)
    sequences, ids, positions = _packed()
    expected = _separately(model, sequences)
    inputs: dict[str, Any] = {"input_ids": ids, "position_ids": positions}
    if given == "cu_seq_lens":
        cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    got, records = routed(model, "flash_attention_2", **inputs)
    assert dispatch.passthrough_counts() == {} and len(records) == 2
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    # Not a test that cannot fail: the same row read as one sequence differs.
    assert (forward(model, input_ids=ids) - expected).abs().max() > 20 * TOLERANCE


def _stand_in_kernel() -> ModuleType:
    """Stands in for the module kernels.get_kernel("kernels-community/flash-attn2") downloads: transformers 5.25's
    load_and_register_attn_kernel only asks it for ``flash_attn_varlen_func`` to choose its wrapper
    (integrations/hub_kernels.py); a routed call never runs the kernel, so the stand-in raises if it does."""
    kernel = ModuleType("stand_in_flash_attn2")

    def flash_attn_varlen_func(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the Hub kernel ran: the call was not routed")

    kernel.flash_attn_varlen_func = flash_attn_varlen_func  # type: ignore[attr-defined]
    return kernel


@pytest.mark.skipif(
    xm.VERSION < (5, 1), reason="names registered after install are reached only through get_interface (5.1+)"
)
def test_hub_flash_kernel_is_routed() -> None:
    hub = pytest.importorskip("transformers.integrations.hub_kernels")
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = "kernels-community/flash-attn2"
    registered = name in ALL_ATTENTION_FUNCTIONS._global_mapping
    if registered:
        pytest.skip(f"{name} is already registered in this process")
    model = build("mistral")
    expected = forward(model)
    with mock.patch.object(hub, "get_kernel", lambda *args, **kwargs: _stand_in_kernel()):
        try:
            hub.load_and_register_attn_kernel(name)
        except ImportError as exc:  # transformers checks the kernels package's version before loading
            pytest.skip(str(exc).split("\n")[0])
    try:
        assert forms.form_of(ALL_ATTENTION_FUNCTIONS._global_mapping[name]) == forms.FLASH
        got, records = routed(model, name)
    finally:
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)
        type(ALL_MASK_ATTENTION_FUNCTIONS)._global_mapping.pop(name, None)
    assert dispatch.passthrough_counts() == {} and [r.site for r in records] == xm.LAYERS
    real = xm.left_padded()["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=TOLERANCE, rtol=0)


def test_flash_form_with_a_paged_cache_is_left_to_transformers() -> None:
    layer = build("llama").model.layers[0].self_attn
    q, k, v = (torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))
    reason = forms.prepare(forms.FLASH, layer, q, k, v, None, {"block_table": torch.zeros(1, 1, dtype=torch.int32)})
    assert isinstance(reason, str) and "paged" in reason


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_flex_form_is_routed_and_matches_flex(family: str) -> None:
    # flex runs here: the routed result (BlockMask made dense, softcap from the call) against flex's own.
    model = build(family)
    with xm.implementation(model, "flex_attention"):
        expected = forward(model)
    got, records = routed(model, "flex_attention")
    assert dispatch.passthrough_counts() == {} and [r.site for r in records] == xm.LAYERS
    real = xm.left_padded()["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=TOLERANCE, rtol=0)


def test_flex_form_serves_gpt_oss_sinks_that_flex_refuses_on_cpu() -> None:
    # transformers' flex function raises for s_aux on CPU (no lse there); routed, the sinks are served.
    model = build("gpt_oss")
    expected = forward(model)
    with xm.implementation(model, "flex_attention"), pytest.raises(ValueError, match="sinks"):
        forward(model)
    got, records = routed(model, "flex_attention")
    assert dispatch.passthrough_counts() == {} and len(records) == 2
    real = xm.left_padded()["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=TOLERANCE, rtol=0)
