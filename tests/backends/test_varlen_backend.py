"""Contract tests of the varlen backends: key-padding masks as packed sequences (fakes of the library; see
kernel_setup.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from kernel_setup import VARLEN, assert_matches, calls_of, expected, padding_mask, qkv, setup_backend

from attnpatch.core import dispatch, registry
from attnpatch.errors import UnsupportedCall


def test_every_varlen_backend_is_covered() -> None:
    """Each backend that packs keys runs the tests below (an entry with no key included): a new one must be added."""
    packing = {b.name for b in registry.list_backends() if b.builtin and "varlen" in b.name}
    assert packing == set(VARLEN)


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
@pytest.mark.parametrize("name", VARLEN)
def test_varlen_packs_key_padding(
    name: str, left: bool, fake_libraries: Any, pretend: Any, strict: None, trusted: None
) -> None:
    dtype, head_dim, module, function = setup_backend(name, pretend)
    q, k, v = qkv(batch=3, seq_q=6, seq_kv=13, heads_kv=2, dtype=dtype, head_dim=head_dim)
    keep = padding_mask([13, 5, 0], 13, left=left)  # the last batch entry has no key at all
    out = dispatch.dispatch_attention(q, k, v, attn_mask=keep, backend=name)
    assert_matches(out, expected(q, k, v, attn_mask=keep))
    assert torch.count_nonzero(out[2]) == 0, "a query with nothing to attend gives 0"
    (call,) = calls_of(module, function)
    assert call["q"][0] == (18, 4, 64), "queries flattened, none dropped"
    # The entry with no key keeps its first key, so no kernel sees an empty sequence (flash-attn's reference path
    # raises IndexError on one, docs/kernel-facts.md); its output rows are zeroed above all the same.
    sent = keep.clone()
    sent[2, 0] = True
    assert call["k"][0] == (19, 2, 64), "only the 13 + 5 attended keys, and one for the empty entry"
    assert call["cu_seqlens_k_value"].tolist() == [0, 13, 18, 19]
    assert call["cu_seqlens_q_value"].tolist() == [0, 6, 12, 18]
    assert (call["max_seqlen_q"], call["max_seqlen_k"]) == (6, 13), "padded lengths: no device sync needed"
    packed = call["k_value"]
    assert torch.equal(packed, k.flatten(0, 1)[sent.flatten()]), "the attended keys, in order"


@pytest.mark.parametrize("name", VARLEN)
def test_varlen_without_mask(name: str, fake_libraries: Any, pretend: Any, strict: None, trusted: None) -> None:
    dtype, head_dim, module, function = setup_backend(name, pretend)
    q, k, v = qkv(batch=2, seq_q=5, seq_kv=7, dtype=dtype, head_dim=head_dim)
    assert_matches(dispatch.dispatch_attention(q, k, v, backend=name), expected(q, k, v))
    (call,) = calls_of(module, function)
    assert call["cu_seqlens_k_value"].tolist() == [0, 7, 14]


@pytest.mark.parametrize("name", VARLEN)
def test_varlen_refuses_other_masks(name: str, fake_libraries: Any, pretend: Any, strict: None, trusted: None) -> None:
    dtype, head_dim, module, function = setup_backend(name, pretend)
    q, k, v = qkv(dtype=dtype, head_dim=head_dim)
    per_query = torch.rand(2, 1, 12, 12) > 0.3
    with pytest.raises(UnsupportedCall, match="does not take a bool attn_mask"):
        dispatch.dispatch_attention(q, k, v, attn_mask=per_query, backend=name)
    assert not calls_of(module, function)
