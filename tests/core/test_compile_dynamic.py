"""torch.compile(dynamic=True) through a patched model: routing must not specialise on shapes (issue 13).

20 sequence lengths through a patched tiny Llama compile once, with no graph break: no routing state is first
loaded or written inside the traced region (settings load when the dispatcher is imported; the SDPA redirect writes
its thread-local only inside its own scope), and nothing routing reads depends on the sequence length.
"""

from __future__ import annotations

import pytest
import torch

import attnpatch

pytest.importorskip("transformers")

from attnpatch.testing import transformers_models as tm


def test_native_compiles_once_for_twenty_lengths() -> None:
    from torch._dynamo.utils import counters

    model = tm.llama()
    attnpatch.apply(model, backend="native")
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
