"""FlashAttention 2 (``flash_attn``) and FlashAttention 3 (``flash_attn_interface``), dense and varlen.

What each kernel takes, from the libraries' docstrings and source (flash_attn/flash_attn_interface.py,
hopper/flash_attn_interface.py, README):

- q: (batch, seqlen_q, nheads, headdim), k/v: (batch, seqlen_k, nheads_k, headdim): the dispatcher's layout, so no
  transpose. nheads % nheads_k == 0 (GQA/MQA) is native. fp16/bf16 only.
- FA2: Ampere or newer (sm80+), head dims up to 256 (the Python wrapper pads to a multiple of 8), dropout, backward,
  ``deterministic`` backward switch. FA3: Hopper only ("Requirements: H100 / H800 GPU"), head dim a multiple of 8
  up to 256, no dropout; its ``flash_attn_func`` returned ``(out, lse)`` in the beta and ``out`` since.
- ``causal=True`` is aligned to the bottom-right corner of the score matrix when seqlen_q != seqlen_k, while SDPA
  (and so the dispatcher) aligns it top-left: such calls get a reason (``causal_cross=False``) instead of an answer
  that differs silently.
- No attention mask. Key-padding masks go to the varlen kernels: keys packed with cu_seqlens, every query row kept,
  max_seqlen_k = the padded length (an upper bound; the exact max would cost a device sync).

The Hub builds of the same libraries (``flash_hub``, ``flash_varlen_hub``, ``_flash_3_hub``, ``_flash_3_varlen_hub``,
``flash_4_hub``; loading in attnpatch/backends/hub.py) are declared at the end, next to the pip ones: same kernel
function and capabilities, another library module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from attnpatch.backends import _probe, _varlen, hub
from attnpatch.backends._define import define
from attnpatch.backends._probe import HALF
from attnpatch.core.call import MASK_KEY_PADDING, MASK_NONE, BackendFn
from attnpatch.core.capabilities import Capabilities

FLASH_VERSION = "2.6.3"
FLASH_HINT = " --no-build-isolation"
FA3_HINT = (
    "build FlashAttention-3 from source: git clone https://github.com/Dao-AILab/flash-attention && "
    "cd flash-attention/hopper && python setup.py install"
)

NO_MASK = frozenset({MASK_NONE})
KEY_PADDING = frozenset({MASK_NONE, MASK_KEY_PADDING})


def flash_kernel(library: Callable[[], Any], *, version: int = 2, varlen: bool = False) -> BackendFn:
    """``flash_attn_func`` (``flash_attn_varlen_func`` with ``varlen``) of the module ``library()`` returns.

    version 2: FlashAttention-2, with dropout and the ``deterministic`` backward switch. version 3 (and 4, the same
    call): no dropout; its beta returned ``(out, lse)``, later releases ``out``, so a tuple has its output taken.
    varlen: key-padding masks as packed keys (see attnpatch/backends/_varlen.py).
    """

    def flash(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
        enable_gqa: bool,
    ) -> torch.Tensor:
        """q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim) -> like q."""
        kwargs: dict[str, Any] = {"softmax_scale": scale, "causal": is_causal}
        if version == 2:
            kwargs.update(dropout_p=dropout_p, deterministic=_probe.deterministic())
        module = library()
        if varlen:
            return _varlen.run_varlen(module.flash_attn_varlen_func, query, key, value, attn_mask, **kwargs)
        out = module.flash_attn_func(query, key, value, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    flash.__name__ = flash.__qualname__ = f"flash{'' if version == 2 else version}{'_varlen' if varlen else ''}"
    return flash


# What FlashAttention-2 serves; FlashAttention-3 (and 4) differ as FA3 says. Shared with the Hub builds below.
FA2 = Capabilities(
    devices=frozenset({"cuda"}),
    dtypes=HALF,
    max_head_dim=256,
    same_v_head_dim=True,
    causal_cross=False,
    min_compute_capability=(8, 0),
)
FA3 = dataclasses.replace(
    FA2,
    head_dim_multiple=8,
    dropout=False,
    deterministic=False,  # its backward switch is not forwarded: the beta and current signatures differ
    min_compute_capability=(9, 0),
    max_compute_capability=(9, 0),
)


def flash2_caps(masks: frozenset[str], priority: int, **overrides: Any) -> Capabilities:
    """What FlashAttention-2 serves with ``masks`` at ``priority`` (shared with flash_hub / flash_varlen_hub)."""
    return dataclasses.replace(FA2, masks=masks, priority=priority, **overrides)


def flash3_caps(masks: frozenset[str], priority: int, **overrides: Any) -> Capabilities:
    """What FlashAttention-3 serves (shared with _flash_3_hub / _flash_3_varlen_hub, and flash_4_hub)."""
    return dataclasses.replace(FA3, masks=masks, priority=priority, **overrides)


def _module(name: str) -> Callable[[], Any]:
    return lambda: _probe.lib(name)


# What every pip FlashAttention backend declares besides its kernel: the family, availability and the import check.
_FA2: dict[str, Any] = {
    "family": "flash",
    "requires": _probe.requires("flash_attn", "flash-attn", FLASH_VERSION, FLASH_HINT),
    "check": _probe.library_check("flash_attn"),
    "kernel": True,
}
_FA3: dict[str, Any] = {
    "family": "flash",
    "requires": _probe.requires("flash_attn_interface", "flash-attn-3", hint=FA3_HINT),
    "check": _probe.library_check("flash_attn_interface"),
    "kernel": True,
}


define(
    "flash",
    flash_kernel(_module("flash_attn")),
    # Below _native_cudnn (45): on Hopper cuDNN beats FlashAttention-2; above torch's bundled FA2 (40).
    caps=flash2_caps(NO_MASK, priority=44),
    description="flash_attn.flash_attn_func (FlashAttention-2); sm80+, fp16/bf16, no mask",
    aliases=("flash_attn", "flash_attention", "flash_attn_2", "flash2", "fa2"),
    **_FA2,
)

define(
    "flash_varlen",
    flash_kernel(_module("flash_attn"), varlen=True),
    caps=flash2_caps(KEY_PADDING, priority=43),
    description="flash_attn.flash_attn_varlen_func: key-padding masks as packed sequences",
    aliases=("flash_attn_varlen",),
    **_FA2,
)

define(
    "_flash_3",
    flash_kernel(_module("flash_attn_interface"), version=3),
    caps=flash3_caps(NO_MASK, priority=60),
    description="FlashAttention-3 flash_attn_interface.flash_attn_func; Hopper (sm90) only",
    aliases=("flash_3", "flash3", "fa3", "flash_attn_3"),
    **_FA3,
)

define(
    "_flash_varlen_3",
    flash_kernel(_module("flash_attn_interface"), version=3, varlen=True),
    caps=flash3_caps(KEY_PADDING, priority=59),
    description="FlashAttention-3 flash_attn_varlen_func: key-padding masks as packed sequences; sm90",
    aliases=("flash_varlen_3", "_flash_3_varlen", "flash3_varlen"),
    **_FA3,
)


# ----- the same kernels from the Hugging Face Hub (opt-in; see attnpatch/backends/hub.py) -----------------------

hub.define_hub(
    "flash_hub",
    flash_kernel(hub.module("flash_hub")),
    flash2_caps(NO_MASK, priority=0),
    "FlashAttention-2 from kernels-community/flash-attn2 (Hub, opt-in)",
    _probe.compiled_dropout_reasons,
)
hub.define_hub(
    "flash_varlen_hub",
    flash_kernel(hub.module("flash_varlen_hub"), varlen=True),
    flash2_caps(KEY_PADDING, priority=0),
    "FlashAttention-2 varlen from kernels-community/flash-attn2 (Hub, opt-in): key-padding masks",
    _probe.compiled_dropout_reasons,
)
hub.define_hub(
    "_flash_3_hub",
    flash_kernel(hub.module("_flash_3_hub"), version=3),
    flash3_caps(NO_MASK, priority=0),
    "FlashAttention-3 from kernels-community/flash-attn3 (Hub, opt-in); sm90",
)
hub.define_hub(
    "_flash_3_varlen_hub",
    flash_kernel(hub.module("_flash_3_varlen_hub"), version=3, varlen=True),
    flash3_caps(KEY_PADDING, priority=0),
    "FlashAttention-3 varlen from kernels-community/flash-attn3 (Hub, opt-in): key-padding masks; sm90",
)
hub.define_hub(
    "flash_4_hub",
    # FlashAttention-4 (flash_attn/cute/interface.py): the FA3 call; "Supported: 9.x, 10.x, 11.x", hdim <= 256 and
    # a multiple of 8, fp16/bf16, no dropout, causal aligned bottom-right like every FlashAttention.
    flash_kernel(hub.module("flash_4_hub"), version=3),
    flash3_caps(NO_MASK, priority=0, max_compute_capability=(11, 0)),
    "FlashAttention-4 (CuTe DSL) from kernels-community/flash-attn4 (Hub, opt-in); sm90-sm110",
)
