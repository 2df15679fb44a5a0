"""The transformers patcher on real tiny models: every attention call reaches the dispatcher, `native` gives the
unpatched result bit for bit, calls a backend cannot honour run transformers' own code (counted), and
uninstall leaves nothing behind.

Runs on the transformers in this environment; what a version cannot do is skipped with the reason. Verified on
5.23 (newest), 4.57, 4.48 and 4.46 (the oldest that installs with torch 2.13 on Python 3.11). Old-version leg:

    python3 -m venv /tmp/venv-tf446
    /tmp/venv-tf446/bin/pip install torch==2.13.0 'transformers==4.46.*' wrapt pytest sentencepiece protobuf
    /tmp/venv-tf446/bin/pip install --no-deps -e .
    /tmp/venv-tf446/bin/python -m pytest -q -p no:cacheprovider tests/patchers/test_transformers_patch.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnpatch import api  # noqa: E402
from attnpatch.core import dispatch, hooks, selection  # noqa: E402
from attnpatch.core.hooks import CallRecord  # noqa: E402
from attnpatch.patchers import MODULE_ATTR, SITE_ATTR, state  # noqa: E402
from attnpatch.patchers import transformers as patcher  # noqa: E402
from attnpatch.testing import tiny  # noqa: E402
from attnpatch.testing import transformers_models as tm  # noqa: E402

VERSION = tm.TRANSFORMERS_VERSION
HAS_GET_INTERFACE = hasattr(getattr(transformers.modeling_utils, "AttentionInterface", None), "get_interface")


@pytest.fixture
def patched() -> Iterator[None]:
    patcher.install()
    yield
    patcher.uninstall()
    state.route_all = False


def mark(model: torch.nn.Module, spec: str = "native") -> list[str]:
    """What apply does to the layers the patcher names: a selection and a site on each. Returns the sites."""
    selection.resolve(spec)  # apply validates the selection (and so resolves it) before marking
    layers = patcher.attention_modules(model)
    for name, layer in layers:
        setattr(layer, MODULE_ATTR, spec)
        setattr(layer, SITE_ATTR, name)
    return [name for name, _ in layers]


@contextmanager
def recorded() -> Iterator[list[CallRecord]]:
    records: list[CallRecord] = []
    hooks.add_observer(records.append)
    try:
        yield records
    finally:
        hooks.remove_observer(records.append)


@contextmanager
def counted_sdpa() -> Iterator[mock.MagicMock]:
    """Count F.scaled_dot_product_attention calls (transformers looks it up at call time)."""
    original = torch.nn.functional.scaled_dot_product_attention
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", wraps=original) as spy:
        yield spy


# ------------------------------------------------------------------------------------------------ the models


@dataclass
class Case:
    id: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict[str, Any]]
    output: Callable[[Any], torch.Tensor]
    sites: list[str] | Callable[[torch.nn.Module], list[str]]  # the attention layers, by qualified name
    calls: int  # attention calls in one forward of `inputs`
    min_version: tuple[int, int] = (4, 46)
    why_not_older: str = ""
    sdpa_calls: bool = True  # the unpatched model calls F.sdpa once per attention call (cross-check of `calls`)
    math_tol: float = 1e-5

    def skip_if_unsupported(self) -> None:
        if self.min_version > VERSION:
            pytest.skip(f"transformers {transformers.__version__}: {self.why_not_older}")


def _llama_inputs() -> dict[str, Any]:
    ids, mask = tm.left_padded_ids()
    return {"input_ids": ids, "attention_mask": mask}


def _clip_inputs() -> dict[str, Any]:
    tokens = tiny.clip_tokenizer()(["a photo of a cat", "a dog"], padding="max_length", return_tensors="pt")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def _t5_inputs() -> dict[str, Any]:
    ids = torch.tensor([[5, 6, 7, 8, 1, 0, 0], [9, 10, 11, 12, 13, 14, 1]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


_NO_T5_SDPA = "T5-family attention is computed inline (matmul + softmax) before 5.15: nothing to route"
_EAGER_INLINE = "eager layers compute attention inline before 4.48 (no eager_attention_forward): nothing to route"

CASES = [
    Case(
        "llama",
        tm.llama,
        _llama_inputs,
        lambda out: out.logits,
        ["model.layers.0.self_attn", "model.layers.1.self_attn"],
        calls=2,
    ),
    Case(
        "llama_unpadded",  # no mask at all: causality comes from the layer's is_causal, as the kernel flag
        tm.llama,
        lambda: {"input_ids": tm.left_padded_ids()[0][1:]},
        lambda out: out.logits,
        ["model.layers.0.self_attn", "model.layers.1.self_attn"],
        calls=2,
    ),
    Case(
        "bert",
        tm.bert,
        _llama_inputs,
        lambda out: out.last_hidden_state,
        ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"],
        calls=2,
    ),
    Case(
        "clip_text",
        tm.clip_text,
        _clip_inputs,
        lambda out: torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()]),
        # transformers 5.x (after 5.0) dropped CLIPTextModel's inner `text_model` level
        lambda model: [
            f"{'text_model.' if hasattr(model, 'text_model') else ''}encoder.layers.{i}.self_attn" for i in (0, 1)
        ],
        calls=2,
    ),
    Case(
        "t5_encoder",
        tm.t5_encoder,
        _t5_inputs,
        lambda out: out.last_hidden_state,
        ["encoder.block.0.layer.0.SelfAttention", "encoder.block.1.layer.0.SelfAttention"],
        calls=2,
        min_version=(5, 15),
        why_not_older=_NO_T5_SDPA,
    ),
    Case(
        "t5_encoder_eager",  # eager adds the position bias to the scores itself: folded into an additive mask
        lambda: tm.t5_encoder(attn_implementation="eager"),
        _t5_inputs,
        lambda out: out.last_hidden_state,
        ["encoder.block.0.layer.0.SelfAttention", "encoder.block.1.layer.0.SelfAttention"],
        calls=2,
        sdpa_calls=False,
        min_version=(5, 15),
        why_not_older=_NO_T5_SDPA,
    ),
    Case(
        "umt5_encoder",
        tm.umt5_encoder,
        _t5_inputs,
        lambda out: out.last_hidden_state,
        ["encoder.block.0.layer.0.SelfAttention", "encoder.block.1.layer.0.SelfAttention"],
        calls=2,
        min_version=(5, 15),
        why_not_older=_NO_T5_SDPA,
    ),
    Case(
        "gemma2_no_softcap",
        lambda: tm.gemma2(softcap=None),
        _llama_inputs,
        lambda out: out.logits,
        ["model.layers.0.self_attn", "model.layers.1.self_attn"],
        calls=2,
        sdpa_calls=False,  # transformers 5 runs Gemma2 eager only
        min_version=(4, 48),
        why_not_older=_EAGER_INLINE,
    ),
    Case(
        "qwen2_5_vl",
        tm.qwen2_5_vl,
        tm.qwen2_5_vl_inputs,
        lambda out: out.logits,
        [
            "model.visual.blocks.0.attn",
            "model.visual.blocks.1.attn",
            "model.language_model.layers.0.self_attn",
            "model.language_model.layers.1.self_attn",
        ],
        # vision: block 0 attends within 2 windows per image, block 1 over each whole image (2 images);
        # text: 2 layers.
        calls=4 + 2 + 2,
        min_version=(4, 49),
        why_not_older="Qwen2.5-VL was added in 4.49",
    ),
]


def _forward(case: Case, model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model(**case.inputs()))


def _eager_like(case: Case) -> bool:
    """Eager layers are routed, but `native` is then SDPA, not eager's matmul+softmax: close, not bitwise."""
    return not case.sdpa_calls


@pytest.fixture(params=CASES, ids=lambda c: c.id)
def case(request: pytest.FixtureRequest) -> Case:
    case: Case = request.param
    case.skip_if_unsupported()
    return case


def test_attention_modules_are_exactly_the_attention_layers(case: Case) -> None:
    model = case.build()
    expected = case.sites(model) if callable(case.sites) else case.sites
    assert [name for name, _ in patcher.attention_modules(model)] == expected


def test_native_routes_every_call_and_matches_unpatched(case: Case, patched: None) -> None:
    model = case.build()
    with counted_sdpa() as spy:
        expected = _forward(case, model)
    if case.sdpa_calls:
        assert spy.call_count == case.calls  # the unpatched model's own count of attention calls
    sites = mark(model, "native")
    with recorded() as records:
        got = _forward(case, model)
    assert len(records) == case.calls
    assert {r.site for r in records} == set(sites)
    assert {r.served for r in records} == {"native"}
    assert dispatch.passthrough_counts() == {}
    if _eager_like(case):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    else:
        assert torch.equal(got, expected)


def test_native_math_within_tolerance(case: Case, patched: None) -> None:
    model = case.build()
    expected = _forward(case, model)
    mark(model, "_native_math")
    with recorded() as records:
        got = _forward(case, model)
    assert {r.served for r in records} == {"_native_math"} and len(records) == case.calls
    torch.testing.assert_close(got, expected, atol=case.math_tol, rtol=1e-4)


def test_uninstall_restores_bitwise_and_leaves_no_wrappers(case: Case) -> None:
    model = case.build()
    expected = _forward(case, model)
    patcher.install()
    mark(model, "_native_math")
    with recorded() as records:
        _forward(case, model)
    assert len(records) == case.calls
    patcher.uninstall()
    with recorded() as records:
        assert torch.equal(_forward(case, model), expected)
    assert records == []
    assert_no_wrappers()


def assert_no_wrappers() -> None:
    """Nothing transformers looks up at call time is one of our routers any more."""
    modeling_utils = transformers.modeling_utils
    interface = getattr(modeling_utils, "AttentionInterface", None)
    if interface is not None:
        for name, fn in vars(interface).items():
            assert not hasattr(fn, patcher._ROUTER_ATTR), f"AttentionInterface.{name} is still wrapped"
        for key, fn in getattr(interface, "_global_mapping", {}).items():
            assert not hasattr(fn, patcher._ROUTER_ATTR), f"AttentionInterface mapping {key!r} is still wrapped"
    functions = getattr(modeling_utils, "ALL_ATTENTION_FUNCTIONS", None)
    if functions is not None:
        for key in list(functions):
            assert not hasattr(functions[key], patcher._ROUTER_ATTR), f"ALL_ATTENTION_FUNCTIONS[{key!r}] is wrapped"
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers.models.") and module is not None:
            fn = module.__dict__.get("eager_attention_forward")
            assert not hasattr(fn, patcher._ROUTER_ATTR), f"{name}.eager_attention_forward is still wrapped"
            for cls in vars(module).values():
                if isinstance(cls, type) and cls.__module__ == name:
                    for attr, member in vars(cls).items():
                        assert not hasattr(member, patcher._ROUTER_ATTR), f"{cls.__qualname__}.{attr} is still wrapped"
    assert torch.nn.functional.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


# ------------------------------------------------------------------------------------------ model-specific


def test_llama_left_padded_greedy_generate_with_kv_cache(patched: None) -> None:
    model = tm.llama()
    ids, mask = tm.left_padded_ids()
    new_tokens = 8
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    mark(model, "native")
    with recorded() as records, torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(got, expected)
    # one prefill over the prompt, then one step per further token, each through both layers
    assert len(records) == 2 * new_tokens
    assert records[-1].key.shape[1] == ids.shape[1] + new_tokens - 1  # the KV cache grew to the full length
    assert all(r.attn_mask is not None for r in records)  # left padding keeps a mask on every call
    # A backend that does GQA itself gets the attention function's K/V un-repeated (native instead gets them laid
    # out as transformers' sdpa function would, to stay bitwise: test_native_is_bitwise_the_unpatched_gqa_decode).
    mark(model, "_native_math")
    with recorded() as records, torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(got, expected)
    assert [r.query.shape[1] for r in records[::2]] == [ids.shape[1]] + [1] * (new_tokens - 1)
    if VERSION >= (4, 48):  # the attention function gets K/V un-repeated; 4.4x layers repeat them before F.sdpa
        assert records[-1].key.shape[2] == 2 and records[-1].query.shape[2] == 4


@pytest.mark.skipif(VERSION < (5, 15), reason=_NO_T5_SDPA)
def test_t5_encoder_decoder_generate_folds_position_bias(patched: None) -> None:
    model = tm.t5_seq2seq()
    inputs = _t5_inputs()
    decoder_ids = torch.tensor([[0, 5, 6], [0, 7, 8]])
    with torch.no_grad():
        expected = model(**inputs, decoder_input_ids=decoder_ids).logits
        expected_tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    sites = mark(model, "native")
    assert len(sites) == 6  # encoder self x2, decoder self x2, decoder cross x2
    with recorded() as records, torch.no_grad():
        assert torch.equal(model(**inputs, decoder_input_ids=decoder_ids).logits, expected)
        assert len(records) == 6
        assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), expected_tokens)
    # every relative position bias reached the backend folded into an additive mask
    assert all(r.attn_mask is not None and r.attn_mask.is_floating_point() for r in records)
    assert dispatch.passthrough_counts() == {}


def test_two_models_keep_their_own_backends(patched: None) -> None:
    first, second = tm.llama(), tm.llama()
    mark(first, "native")
    mark(second, "_native_math")
    with recorded() as records:
        _forward(CASES[0], first)
        _forward(CASES[0], second)
    assert [r.served for r in records] == ["native"] * 2 + ["_native_math"] * 2


@pytest.mark.skipif(VERSION < (4, 48), reason="transformers before 4.48 has no attention function to call")
def test_call_shape_we_do_not_know_runs_the_original(patched: None) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = tm.llama().model.layers[0].self_attn
    mark(layer, "native")
    setattr(layer, SITE_ATTR, "layer")
    router = patcher._router_for(sdpa_attention_forward, "sdpa")
    q = torch.randn(1, 4, 3, 16)
    k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    with recorded() as records:
        out, _ = router(layer, q, k, v, None, 0.0, 0.25)  # dropout and scaling passed positionally
    assert records == []
    assert torch.equal(out, sdpa_attention_forward(layer, q, k, v, None, 0.0, 0.25)[0])
    ((site, reason),) = dispatch.passthrough_counts()
    assert site == "layer" and "positional" in reason


@pytest.mark.parametrize("padded", [True, False], ids=["left_padded", "unpadded"])
def test_llama_generate_with_static_cache(patched: None, padded: bool) -> None:
    # A static cache hands over keys (and a mask) as long as the whole cache; unpadded, transformers 5 sends the
    # prefill with no mask and is_causal, and the router crops the never-attended keys as transformers does.
    model = tm.llama()
    ids, mask = tm.left_padded_ids()
    if not padded:
        ids, mask = ids[1:], mask[1:]
    options = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **options)
    mark(model, "native")
    with recorded() as records, torch.no_grad():
        assert torch.equal(model.generate(ids, attention_mask=mask, **options), expected)
    assert len(records) == 2 * 6


@pytest.mark.skipif(VERSION < (4, 48), reason=_EAGER_INLINE + " (and Gemma2's SDPA layer drops softcap itself)")
def test_gemma2_softcap_is_routed(patched: None) -> None:
    # Issue 12: soft-capped calls reach the dispatcher (route(softcap=)); they ran transformers' eager code before.
    # That soft-capping changes the result is shown in test_transformers_extra_families.py.
    model = tm.gemma2(softcap=50.0)
    expected = _forward(CASES[0], model)
    mark(model, "native")
    with recorded() as records:
        got = _forward(CASES[0], model)
    assert [r.site for r in records] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert dispatch.passthrough_counts() == {}
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)


@pytest.mark.skipif(VERSION < (4, 48), reason=_EAGER_INLINE)
def test_eager_is_routed_only_while_no_attention_weights_are_requested(patched: None) -> None:
    model = tm.llama(attn_implementation="eager")
    inputs = _llama_inputs()
    with torch.no_grad():
        expected = model(**inputs, output_attentions=True)
        expected_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    mark(model, "native")
    with recorded() as records, torch.no_grad():
        got = model(**inputs, output_attentions=True)
    assert records == []
    assert sum(dispatch.passthrough_counts().values()) == 2
    assert all("output_attentions" in reason for _, reason in dispatch.passthrough_counts())
    assert torch.equal(got.logits, expected.logits)
    assert all(torch.equal(a, b) for a, b in zip(got.attentions, expected.attentions, strict=True))

    dispatch.reset_fallbacks()
    with recorded() as records, torch.no_grad():
        got = model(**inputs)
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert len(records) == 2 + 2 * 6
    assert dispatch.passthrough_counts() == {}
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(tokens, expected_tokens)


def test_unmarked_layers_run_the_original_code(patched: None) -> None:
    model = tm.llama()
    expected = _forward(CASES[0], model)
    with recorded() as records, counted_sdpa() as spy:
        assert torch.equal(_forward(CASES[0], model), expected)
    assert records == [] and dispatch.passthrough_counts() == {}
    assert spy.call_count == 2


def test_route_all_routes_layers_nobody_marked(patched: None) -> None:
    model = tm.llama()
    expected = _forward(CASES[0], model)
    state.route_all = True
    with recorded() as records:
        assert torch.equal(_forward(CASES[0], model), expected)
    assert len(records) == 2 and {r.served for r in records} == {"native"}


def test_marked_layer_uses_its_own_selection_over_the_context(patched: None) -> None:
    model = tm.llama()
    mark(model, "_native_math")
    with recorded() as records, selection.attention_backend("native"):
        _forward(CASES[0], model)
    assert {r.served for r in records} == {"_native_math"}


def test_compiled_llama_forward_has_no_graph_breaks(patched: None) -> None:
    model = tm.llama()
    ids, mask = tm.left_padded_ids()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    mark(model, "native")
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            explanation = torch._dynamo.explain(lambda i, m: model(i, attention_mask=m).logits)(ids, mask)
            assert explanation.graph_break_count == 0, explanation.break_reasons
            torch._dynamo.reset()
            compiled = torch.compile(lambda i, m: model(i, attention_mask=m).logits, fullgraph=True)
            torch.testing.assert_close(compiled(ids, mask), expected, atol=1e-5, rtol=1e-4)
    finally:
        torch._dynamo.reset()


def test_install_is_idempotent_and_routers_are_stable() -> None:
    patcher.install()
    patcher.install()
    try:
        patches = patcher.PATCHER.patches.entries()
        assert len(patches) == len({(id(o), n) for o, n, _ in patches})
        model = tm.llama()
        mark(model, "native")
        with recorded() as records:
            _forward(CASES[0], model)
        assert len(records) == 2  # wrapped once: one dispatcher call per attention call
        if HAS_GET_INTERFACE:
            functions = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS
            first = functions.get_interface("sdpa", None)
            assert first is functions.get_interface("sdpa", None)
            assert first.__wrapped__ is transformers.integrations.sdpa_attention.sdpa_attention_forward
    finally:
        patcher.uninstall()
        patcher.uninstall()
    assert_no_wrappers()


@pytest.mark.skipif(not HAS_GET_INTERFACE, reason="custom implementations are looked up by get_interface (5.1+)")
def test_implementation_we_do_not_route_is_counted_as_passthrough(patched: None) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    name = "attnpatch_test_kernel"
    AttentionInterface.register(name, lambda *args, **kwargs: sdpa_attention_forward(*args, **kwargs))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    try:
        model = tm.llama(attn_implementation=name)
        expected = _forward(CASES[0], model)
        mark(model, "native")
        with recorded() as records:
            assert torch.equal(_forward(CASES[0], model), expected)
        assert records == []
        (reason,) = {reason for _, reason in dispatch.passthrough_counts()}
        assert name in reason and sum(dispatch.passthrough_counts().values()) == 2
    finally:
        AttentionInterface._global_mapping.pop(name, None)
        type(ALL_MASK_ATTENTION_FUNCTIONS)._global_mapping.pop(name, None)


def test_eager_function_that_is_more_than_softmax_attention_is_not_routed(patched: None) -> None:
    # gpt-oss style: attention sinks read from the layer, not passed as an argument.
    def sinks_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        sinks = module.sinks.reshape(1, -1, 1, 1).expand(query.shape[0], -1, query.shape[-2], -1)
        logits = torch.cat([torch.matmul(query, key.transpose(2, 3)) * scaling, sinks], dim=-1)
        probs = torch.softmax(logits, dim=-1)[..., :-1]
        return torch.matmul(probs, value).transpose(1, 2), probs

    layer = torch.nn.Module()
    layer.sinks = torch.zeros(2)
    setattr(layer, MODULE_ATTR, "native")
    setattr(layer, SITE_ATTR, "layer")
    q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))
    router = patcher._router_for(sinks_eager, "eager")
    with recorded() as records:
        out, weights = router(layer, q, k, v, None, scaling=0.5)
    expected, expected_weights = sinks_eager(layer, q, k, v, None, scaling=0.5)
    assert records == [] and torch.equal(out, expected) and torch.equal(weights, expected_weights)
    ((site, reason),) = dispatch.passthrough_counts()
    assert site == "layer" and "sinks" in reason


@pytest.mark.parametrize(
    ("module", "plain"),
    [
        ("llama.modeling_llama", True),
        ("clip.modeling_clip", True),
        ("t5.modeling_t5", True),
        ("gemma2.modeling_gemma2", True),
        ("gpt_oss.modeling_gpt_oss", False),
        ("granite_swa.modeling_granite_swa", False),
    ],
)
def test_eager_functions_are_told_apart(module: str, plain: bool) -> None:
    try:
        fn = __import__(f"transformers.models.{module}", fromlist=["_"]).eager_attention_forward
    except (ImportError, AttributeError):
        pytest.skip(f"transformers {transformers.__version__} has no {module}.eager_attention_forward")
    fn = getattr(fn, patcher._ROUTER_ATTR, fn)
    assert (patcher.calls.plain_eager_refusal(fn) is None) == plain


def test_install_before_transformers_is_imported_patches_it_on_import() -> None:
    script = textwrap.dedent(
        """
        import sys
        from attnpatch.patchers import transformers as patcher, state
        patcher.install()
        assert "transformers.modeling_utils" not in sys.modules
        sys.path.insert(0, sys.argv[1])
        from attnpatch.testing import transformers_models as tm
        from attnpatch.core import dispatch, hooks, selection
        state.route_all = True
        calls = []
        hooks.add_observer(calls.append)
        ids, mask = tm.left_padded_ids()
        tm.llama()(ids, attention_mask=mask)
        print(len(calls))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, os.path.dirname(os.path.dirname(__file__))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "2"


def test_unsupported_names_what_is_not_routed() -> None:
    reasons = patcher.unsupported()
    if VERSION < (4, 48):
        assert len(reasons) == 1 and "attn_implementation='eager' are not routed" in reasons[0]
    else:
        assert reasons == []


@pytest.mark.skipif(VERSION < (5, 0), reason="@capture_outputs (weights by output hooks) is transformers 5")
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_weights_collected_by_output_hooks_are_never_lost(implementation: str) -> None:
    # Issue 11: GPT-2 in transformers 5 collects attention weights by hooking its attention modules' outputs while
    # a collector is active; output_attentions=True on the model's forward reaches neither the attention function
    # nor the config. Routed, the weights came back empty; a user never gets fewer outputs than asked for.
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    config._attn_implementation = implementation
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        unpatched = model(ids, output_attentions=True)
    api.install("native")
    try:
        with torch.no_grad():
            routed = model(ids, output_attentions=True)
            plain = model(ids)
    finally:
        api.uninstall()
    assert len(routed.attentions) == len(unpatched.attentions)
    for ours, theirs in zip(routed.attentions, unpatched.attentions, strict=True):
        assert (ours is None) == (theirs is None)
        if theirs is not None:
            torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(routed.logits, unpatched.logits)
    torch.testing.assert_close(plain.logits, unpatched.logits)


@pytest.mark.parametrize("model_name", ["llama", "qwen2"])
def test_native_is_bitwise_the_unpatched_gqa_decode(model_name: str) -> None:
    # Issue 11: a GQA model decoding a left-padded batch differed by ~1e-7 per step under native (enable_gqa where
    # transformers repeats key/value heads or packs the query heads). native lays the call out as transformers' own
    # sdpa function does, so every step's scores are bitwise the unpatched ones.
    if model_name == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(**tm.DECODER, attn_implementation="sdpa")
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
    else:
        model = tm.llama()
    ids, mask = tm.left_padded_ids()

    def generate() -> Any:
        with torch.no_grad():
            return model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=6,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )

    unpatched = generate()
    api.apply(model, backend="native")
    try:
        routed = generate()
    finally:
        api.unapply(model)
    assert torch.equal(routed.sequences, unpatched.sequences)
    for ours, theirs in zip(routed.scores, unpatched.scores, strict=True):
        assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def test_fallback_warnings_point_at_the_model_code_not_at_attnpatch() -> None:
    # Issue 11: the one fallback warning named attnpatch's patcher as its location; it names the caller's frame.
    model = tm.llama()
    ids, mask = tm.left_padded_ids()
    api.apply(model, backend="_native_cudnn")  # CUDA only: on this CPU every call falls back to native
    try:
        dispatch.reset_fallbacks()
        with pytest.warns(Warning) as caught, torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        api.unapply(model)
    ours = [w for w in caught if "cannot serve this call" in str(w.message)]
    assert ours, [str(w.message) for w in caught]
    for warning in ours:
        assert f"{os.sep}attnpatch{os.sep}" not in warning.filename, warning.filename
        assert "wrapt" not in warning.filename and f"torch{os.sep}nn" not in warning.filename, warning.filename


def test_unsupported_names_the_newest_verified_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    if VERSION >= patcher.MAPPING_VERSION:  # (the old-versions leg runs 4.46, which has its own reason)
        assert patcher.unsupported() == [], "the installed transformers is a verified one"
    assert tuple(int(p) for p in importlib.metadata.version("transformers").split(".")[:2]) <= patcher.NEWEST_TESTED
    monkeypatch.setattr(patcher, "transformers_version", lambda: (5, 99, 0))
    [reason] = patcher.unsupported()
    assert reason.startswith("transformers 5.99.0 is newer than 5.25, the newest attnpatch was tested with")
