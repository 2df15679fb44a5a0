"""``_native_npu``: ``torch_npu.npu_fusion_attention`` on Ascend NPUs.

From the torch_npu API reference (npu_fusion_attention): ``(query, key, value, head_num, input_layout, pse=None,
padding_mask=None, atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647,
inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, ...)`` returning seven
values, the output first. Used here with ``input_layout="BSND"`` (the dispatcher's layout) and:

- ``scale`` defaults to 1.0, not 1/sqrt(head_dim): always passed.
- ``atten_mask`` is bool with True = *masked* (the opposite of SDPA), shaped BNSS, B1SS, 11SS or SS; additive masks
  are a ``pse`` that is added before scaling, so they get a reason instead.
- causal: ``sparse_mode=2`` ("leftUpCausal": top-left, as SDPA) with the compressed 2048x2048 upper-triangular
  ``atten_mask`` it requires.
- ``pre_tockens``/``next_tockens`` keep their defaults: diffusers passes 65536, which silently drops keys farther
  than 65536 positions away.
- dropout through ``keep_prob``; key heads N2 must divide query heads N1 (GQA); head dim a multiple of 16 up to 512
  (the limits of the CANN FlashAttentionScore kernel this op runs).
torch_npu registers it as an operator with meta functions and a backward, so it is called directly (no custom op).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from attnpatch.backends import _extras, _probe
from attnpatch.backends._define import define
from attnpatch.backends._probe import HALF
from attnpatch.core import masks
from attnpatch.core.call import MASK_BOOL, MASK_KEY_PADDING, MASK_NONE, SdpaArgs
from attnpatch.core.capabilities import Capabilities

if TYPE_CHECKING:
    from typing_extensions import Unpack

LEFT_UP_CAUSAL = 2  # sparse_mode
# Each torch-npu release requires torch of its own release (torch-npu 2.14.0: torch==2.14.0.*), so an unpinned
# `pip install torch-npu` replaces the installed torch with the newest one; the command names this torch's release.
NPU_HINT = (
    f"pip install 'torch-npu=={_probe.torch_release()}.*' (torch-npu pins torch to its own release: an unpinned "
    "torch-npu replaces torch)"
)
COMPRESSED_MASK = 2048


@functools.lru_cache(maxsize=8)
def _causal_mask(device: torch.device) -> torch.Tensor:
    # True above the diagonal = masked: the compressed mask sparse_mode 2 expects.
    return torch.ones(COMPRESSED_MASK, COMPRESSED_MASK, dtype=torch.bool, device=device).triu(diagonal=1)


def native_npu(*args: Unpack[SdpaArgs]) -> torch.Tensor:
    """npu_fusion_attention on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim), BSND."""
    query, key, value, attn_mask, dropout_p, is_causal, scale, _ = args
    npu_fusion_attention = _probe.lib("torch_npu").npu_fusion_attention
    extra: dict[str, object] = {}
    if attn_mask is not None:
        b, h, _, seq_kv = attn_mask.shape
        batch = query.shape[0] if h != 1 else b  # (1, N, S, S) is not an accepted shape; (B, N, S, S) is
        extra["atten_mask"] = (~attn_mask).expand(batch, h, query.shape[1], seq_kv).contiguous()
    elif is_causal:
        extra["atten_mask"] = _causal_mask(query.device)
        extra["sparse_mode"] = LEFT_UP_CAUSAL
    out = npu_fusion_attention(
        query,
        key,
        value,
        query.shape[2],
        "BSND",
        scale=scale if scale is not None else query.shape[-1] ** -0.5,
        keep_prob=1.0 - dropout_p,
        **extra,
    )[0]
    return masks.zero_fully_masked(out, attn_mask)


define(
    "_native_npu",
    native_npu,
    family="npu",
    caps=Capabilities(
        devices=frozenset({"npu"}),
        dtypes=HALF,
        max_head_dim=512,
        head_dim_multiple=16,
        same_v_head_dim=True,
        masks=frozenset({MASK_NONE, MASK_KEY_PADDING, MASK_BOOL}),
        deterministic=False,
        priority=50,  # on NPUs the alternative is native SDPA (10)
        window=True,  # folded into the bool mask
    ),
    requires=_probe.requires("torch_npu", "torch-npu", device=None, hint=NPU_HINT),
    check=_probe.library_check("torch_npu", replayed=False),  # called directly, not through the op
    description="torch_npu.npu_fusion_attention (Ascend); bool/key-padding masks, top-left causal",
    aliases=("npu", "npu_fusion_attention", "native_npu"),
    extra_fn=_extras.window_as_mask(native_npu),  # a window as the mask it becomes (top-left)
)
