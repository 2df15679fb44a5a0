"""Masks that dispatch_attention hands to torch's SDPA (``native``) without normalising them (issue 13: a masked
call's routing must cost under 1 us): a 4-D bool mask, an additive one in the query's dtype, and a 2-D bool
key-padding mask normalised before (its 4-D view, kept from then). Each must give what the normalised mask gives,
and a mask that breaks the rules must still get the dispatcher's one-line error, never a silently broadcast answer.
"""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch.core import masks
from attnpatch.errors import CheckFailed
from tests.reference import reference_attention


def qkv(batch: int = 2, seq_q: int = 5, seq_kv: int = 7, heads: int = 2, dim: int = 8, dtype=torch.float64):
    torch.manual_seed(0)
    q = torch.randn(batch, seq_q, heads, dim, dtype=dtype)
    k, v = (torch.randn(batch, seq_kv, heads, dim, dtype=dtype) for _ in range(2))
    return q, k, v


def padding(batch: int, seq_kv: int, pad: int) -> torch.Tensor:
    mask = torch.ones(batch, seq_kv, dtype=torch.bool)
    mask[:, :pad] = False  # left padding
    return mask


def expected(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    return attnpatch.dispatch_attention(q, k, v, attn_mask=mask, backend="_native_math")


def test_a_padding_mask_passed_again_goes_as_its_view_and_matches_the_reference() -> None:
    q, k, v = qkv()
    mask = padding(2, 7, 3)
    first = attnpatch.dispatch_attention(q, k, v, attn_mask=mask)  # normalised: the view is kept
    assert masks.padding[0] is mask and masks.padding[1].shape == (2, 1, 1, 7)
    second = attnpatch.dispatch_attention(q, k, v, attn_mask=mask)  # the kept view, no normalising
    reference = reference_attention(q, k, v, attn_mask=mask[:, None, None, :])
    for out in (first, second):
        torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)


def test_a_padding_mask_updated_in_place_is_read_again() -> None:
    q, k, v = qkv()
    mask = padding(2, 7, 3)
    attnpatch.dispatch_attention(q, k, v, attn_mask=mask)
    mask[:, :5] = False  # the same object, other values: the kept view shows them
    torch.testing.assert_close(attnpatch.dispatch_attention(q, k, v, attn_mask=mask), expected(q, k, v, mask))


@pytest.mark.filterwarnings("error::attnpatch.errors.AttnpatchWarning")  # each backend serves the call itself
def test_a_batch_one_padding_mask_broadcasts_over_the_batch_on_every_backend() -> None:
    q, k, v = qkv(batch=3, dtype=torch.float32)
    mask = padding(1, 7, 2)
    reference = reference_attention(q.double(), k.double(), v.double(), attn_mask=mask[:, None, None, :])
    for backend in ("native", "native", "_native_math", "flex"):  # native twice: normalised, then the kept view
        out = attnpatch.dispatch_attention(q, k, v, attn_mask=mask, backend=backend)
        torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("batch", "seq_kv", "error"),
    [
        (3, 7, r"2-D mask is key padding \(batch=3\|1, seq_kv=7\)"),  # mask batch 2, query batch 3
        (2, 6, r"2-D mask is key padding \(batch=2\|1, seq_kv=6\)"),  # mask seq_kv 7, keys 6
    ],
)
def test_a_kept_padding_mask_used_with_other_shapes_gets_the_one_line_error(batch, seq_kv, error) -> None:
    q, k, v = qkv()
    mask = padding(2, 7, 3)
    attnpatch.dispatch_attention(q, k, v, attn_mask=mask)
    assert masks.padding[0] is mask
    q, k, v = qkv(batch=batch, seq_kv=seq_kv)
    with pytest.raises(CheckFailed, match=error) as raised:
        attnpatch.dispatch_attention(q, k, v, attn_mask=mask)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_a_one_key_padding_mask_is_never_kept() -> None:
    """A (batch, 1) mask's view would broadcast over any number of keys: it is normalised on every call."""
    q, k, v = qkv(seq_kv=1)
    mask = torch.ones(2, 1, dtype=torch.bool)
    attnpatch.dispatch_attention(q, k, v, attn_mask=mask)
    assert masks.padding[0] is not mask
    q, k, v = qkv(seq_kv=4)
    with pytest.raises(CheckFailed, match=r"seq_kv=4"):
        attnpatch.dispatch_attention(q, k, v, attn_mask=mask)


def test_an_integer_padding_mask_is_not_kept() -> None:
    """Its bool form is a copy, which an in-place update of the mask would leave stale."""
    q, k, v = qkv()
    mask = padding(2, 7, 3).long()
    attnpatch.dispatch_attention(q, k, v, attn_mask=mask)
    assert masks.padding[0] is not mask
    mask[:, :5] = 0
    torch.testing.assert_close(attnpatch.dispatch_attention(q, k, v, attn_mask=mask), expected(q, k, v, mask.bool()))


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_a_4d_mask_goes_to_sdpa_as_it_is_and_matches_the_reference(kind: str) -> None:
    q, k, v = qkv()
    keep = torch.rand(2, 1, 5, 7) > 0.4
    keep[0, 0, 1] = False  # a query row with no key: 0, as the dispatcher promises
    mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))
    out = attnpatch.dispatch_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected(q, k, v, mask), rtol=1e-10, atol=1e-10)
    assert out[0, 1].abs().max() == 0


def test_the_kept_view_is_not_read_while_compiling() -> None:
    """A compiled call must not guard on the eager cache: a new mask normalised in eager code between two compiled
    calls recompiles nothing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q, k, v = qkv()
    first, other = padding(2, 7, 3), padding(2, 7, 1)
    compiled = torch.compile(lambda q, k, v, m: attnpatch.dispatch_attention(q, k, v, attn_mask=m), fullgraph=True)
    out = compiled(q, k, v, first)
    attnpatch.dispatch_attention(q, k, v, attn_mask=other)  # eager: keeps `other`
    attnpatch.dispatch_attention(q, k, v, attn_mask=first)  # eager: keeps `first`
    again = compiled(q, k, v, first)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(again, out)
    torch.testing.assert_close(out, expected(q, k, v, first))


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_a_4d_mask_compiles_in_one_graph(kind: str) -> None:
    """The pass-through (its try/except included) traces with fullgraph=True and gives the normalised answer."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q, k, v = qkv(dtype=torch.float32)
    keep = torch.rand(2, 1, 5, 7) > 0.3
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    compiled = torch.compile(lambda q, k, v, m: attnpatch.dispatch_attention(q, k, v, attn_mask=m), fullgraph=True)
    out = compiled(q, k, v, mask)
    assert sum(counters["graph_break"].values()) == 0
    torch.testing.assert_close(out, expected(q, k, v, mask), rtol=1e-5, atol=1e-5)
