"""torch.compile(dynamic=True) through a patched model: routing must not specialise on shapes (issue 13).

20 sequence lengths through a patched tiny Llama compile once, with no graph break: no routing state is first
loaded or written inside the traced region (settings load when the dispatcher is imported; the SDPA redirect writes
its thread-local only inside its own scope), and nothing routing reads depends on the sequence length.
"""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch.core import hooks

pytest.importorskip("transformers")

from attnpatch.testing import transformers_models as tm

# torch 2.13, two upstream bugs (not attnpatch's routing: the same happens with no attnpatch at all, see
# test_dynamo_keeps_an_attribute_set_after_a_higher_order_op below):
# 1. dynamo: SideEffectsProxyDict (torch/_dynamo/variables/dicts.py) keeps the SideEffects table current when an
#    object's __dict__ was first modelled; speculating any higher-order op (flex_attention_hop, torch.cond) installs a
#    clone of that table (speculate_subgraph, variables/higher_order_ops.py), so an attribute set afterwards on an
#    object made before lands in the discarded table. transformers' DynamicCache makes every DynamicLayer up front;
#    the second layer's lazy_initialization sets self.device and reads it back: "'DynamicLayer' object has no
#    attribute 'device'", and dynamo runs the whole forward eagerly ("Failed to handle graph break gracefully",
#    which counters["graph_break"] does not count). pytorch/pytorch#195866, fixed by #195954 (after 2.13.0).
# 2. Inductor's CPU flex template rejects a score_mod that captures a tensor computed in the graph (the padding mask
#    as a bias): "All the buffers in the score and mask subgraph should be in kernel_group.args.input_buffers"
#    (a realized copy: "NoValidChoicesError"); a graph input captured the same way compiles.
_FLEX_UPSTREAM = (
    "torch 2.13: dynamo loses an attribute set after a higher-order op (pytorch#195866, fixed by #195954), and "
    "Inductor's CPU flex template rejects a score_mod capturing a tensor computed in the graph"
)


@pytest.mark.parametrize(
    "backend", ["native", pytest.param("flex", marks=pytest.mark.xfail(strict=True, reason=_FLEX_UPSTREAM))]
)
def test_compiles_once_for_twenty_lengths(backend: str) -> None:
    from torch._dynamo.utils import counters

    model = tm.llama()
    attnpatch.apply(model, backend=backend)
    try:
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, dynamic=True)
        with torch.no_grad():
            for length in range(3, 23):
                ids = torch.randint(3, 100, (2, length), generator=torch.Generator().manual_seed(length))
                mask = torch.ones(2, length, dtype=torch.long)
                mask[1, :2] = 0  # left padding
                out = compiled(input_ids=ids, attention_mask=mask).logits
                assert out.shape == (2, length, model.config.vocab_size)
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    finally:
        attnpatch.unapply(model)
        torch._dynamo.reset()


@pytest.mark.xfail(
    strict=True,
    raises=torch._dynamo.exc.Unsupported,
    reason="torch 2.13: \"'Layer' object has no attribute 'device'\" (pytorch#195866, fixed by #195954)",
)
def test_dynamo_keeps_an_attribute_set_after_a_higher_order_op() -> None:
    # The first bug above, without attnpatch or transformers. Strict: on a torch with the fix this passes, fails as
    # XPASS, and the flex case above is to be tried again.
    class Layer:
        def __init__(self) -> None:
            self.keys = None  # dynamo models the instance __dict__ from here, before the higher-order op

        def initialise(self, x: torch.Tensor) -> torch.device:
            self.device = x.device
            return self.device

    def forward(x: torch.Tensor) -> torch.Tensor:
        for layer in [Layer(), Layer()]:
            layer.initialise(x)
            x = torch.cond(x.sum() > 0, lambda y: y + 1, lambda y: y - 1, (x,))
        return x

    torch._dynamo.reset()
    try:
        out = torch.compile(forward, fullgraph=True, backend="eager")(torch.ones(3))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, torch.full((3,), 3.0))


def _compiled_static_cache_decodes(model: torch.nn.Module) -> tuple[int, bool]:
    """Decode 3 tokens after a 10-token prompt with a static cache and a compiled forward, then after a 5-token
    prompt under fail_on_recompile: (graphs compiled, whether the shorter prompt recompiled)."""
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model.forward, fullgraph=True)

    def decode(prompt: int) -> None:
        cache = StaticCache(config=model.config, max_cache_len=24)
        ids = torch.randint(3, 100, (1, prompt), generator=torch.Generator().manual_seed(prompt))
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for step in range(3):
            position = torch.tensor([prompt + step])
            out = compiled(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)

    with torch.no_grad():
        decode(10)
        graphs = counters["stats"]["unique_graphs"]
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                decode(5)
        except RuntimeError as exc:
            assert "recompile" in str(exc), exc
            return graphs, True
    return graphs, False


def test_gemma2_static_cache_compiles_as_unpatched() -> None:
    # Issue 13: a tiny Gemma 2 (soft-capped, sliding layers: routed with softcap and window since issue 12) with a
    # static cache compiles the same graphs patched as unpatched, and a shorter prompt recompiles neither.
    model = tm.gemma2()
    try:
        unpatched = _compiled_static_cache_decodes(model)
        attnpatch.apply(model, backend="native")
        records: list[object] = []
        hooks.add_observer(records.append)
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]]))
        finally:
            hooks.remove_observer(records.append)
        assert len(records) == model.config.num_hidden_layers  # every layer's call is routed (eagerly, here)
        patched = _compiled_static_cache_decodes(model)
    finally:
        attnpatch.unapply(model)
        torch._dynamo.reset()
    assert unpatched[1] is False, "transformers itself recompiles here: the comparison means nothing"
    assert patched == unpatched
