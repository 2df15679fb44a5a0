"""AMD AITER ``aiter.flash_attn_func`` (pip ``amd-aiter`` >= 0.1.5): CK FlashAttention for ROCm (MI200/MI300).

From aiter/ops/mha.py (amd-aiter 0.1.7.post2.dev18, l. 1625-1860): the FlashAttention-2 interface (q (batch,
seqlen, nheads, headdim), k/v with nheads_k dividing nheads), fp16/bf16, head dims padded to a multiple of 8 (up
to 256), dropout, a backward that is deterministic by default. ``causal=True`` is aligned bottom-right when
seqlen_q != seqlen_k, so such calls get a reason. ``flash_attn_func`` returns ``out`` alone unless ``return_lse``
(then ``(out, softmax_lse)``); with inputs that require grad its forward asserts ``return_lse`` (l. 1675: the
backward needs the lse), so it is asked for exactly then.

The module is named ``aiter``, like PyPI's unrelated ``aiter`` (async iterators, which ``pip install aiter``
gets): AMD's distribution is ``amd-aiter``. Availability tells them apart without importing (see
:func:`is_amd_aiter`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from attnpatch.backends import _probe, hub
from attnpatch.backends._define import define
from attnpatch.core.call import MASK_NONE, BackendFn, CallSpec, SdpaArgs
from attnpatch.core.capabilities import Capabilities

if TYPE_CHECKING:
    from typing_extensions import Unpack

AITER_VERSION = "0.1.5"
# PyPI has amd-aiter only as pre-releases (0.1.7.post2.dev18): pip finds nothing for 'amd-aiter>=0.1.5' without
# --pre, while a specifier naming a pre-release lets it take one (verified with pip 23.2 dry runs).
AITER_REQUIREMENT = "amd-aiter>=0.1.5.dev0"
AITER_HINT = f"pip install '{AITER_REQUIREMENT}' (or build it from https://github.com/ROCm/aiter)"
NOT_AMD_AITER = (
    "the installed aiter is not AMD's AITER (PyPI's 'aiter' is an unrelated async-iterator library): "
    f"pip uninstall aiter && pip install '{AITER_REQUIREMENT}'"
)


def is_amd_aiter() -> bool:
    """Whether the ``aiter`` that imports (or was imported) is AMD's library. Imports nothing.

    AMD's ``aiter/__init__.py`` ends with ``from .ops.mha import *``, which binds ``flash_attn_func``, the function
    this backend calls; PyPI's aiter 0.13 is a flat package of async-iterator helpers without ``ops/`` or that
    function. So an imported module (AMD's, a source checkout, a test fake) is judged by that attribute, and one
    not imported yet by the file that defines it, ``aiter/ops/mha.py`` in the package that would be imported.
    The ``amd-aiter`` metadata is not the test: a source checkout on sys.path has none, and it stays when PyPI's
    aiter is installed over the same directory (then ``ops/mha.py`` stays too, which is why each call checks the
    imported module again, :func:`imported_reasons`).
    """
    module = sys.modules.get("aiter")
    if module is not None:
        return callable(getattr(module, "flash_attn_func", None))
    try:
        spec = importlib.util.find_spec("aiter")
    except (ImportError, ValueError):
        return False
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    return any(Path(location, "ops", "mha.py").is_file() for location in locations)


@_probe.constant_for_compile  # see _probe.requires
def aiter_requires() -> list[str]:
    """Why AMD's AITER cannot run in this process: not installed, too old, PyPI's namesake, no ROCm GPU."""
    reasons = _probe.package_reasons("aiter", "amd-aiter", AITER_VERSION, hint=AITER_HINT)
    if not reasons and not is_amd_aiter():
        reasons = [NOT_AMD_AITER]
    return reasons + _probe.device_reasons("rocm")


def imported_reasons(call: CallSpec) -> list[str]:
    """After the import: the imported ``aiter`` must have AMD's ``flash_attn_func`` (see :func:`is_amd_aiter`)."""
    module = sys.modules.get("aiter")
    if module is not None and not callable(getattr(module, "flash_attn_func", None)):
        return [NOT_AMD_AITER]
    return []


def aiter_kernel(library: Callable[[], Any]) -> BackendFn:
    """``flash_attn_func`` of the module ``library()`` returns (aiter, or its Hub build), as a dispatcher kernel."""

    def aiter(*args: Unpack[SdpaArgs]) -> torch.Tensor:
        """aiter flash_attn_func on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""
        query, key, value, _, dropout_p, is_causal, scale, _ = args
        kwargs: dict[str, Any] = {"dropout_p": dropout_p, "softmax_scale": scale, "causal": is_causal}
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            kwargs["return_lse"] = True  # its forward asserts return_lse when a backward will follow
        out = library().flash_attn_func(query, key, value, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return aiter


# What AITER's FlashAttention serves (shared with aiter_fa2_hub).
AITER = dataclasses.replace(
    _probe.FUSED_CUDA,  # ROCm tensors are "cuda" tensors; requires() checks for a ROCm torch
    max_head_dim=256,
    masks=frozenset({MASK_NONE}),
    causal_cross=False,
    priority=55,  # above torch's aotriton flash (40) on MI300, the only other kernel there
)


def aiter_caps(**overrides: Any) -> Capabilities:
    """:data:`AITER` with ``overrides``."""
    return dataclasses.replace(AITER, **overrides)


define(
    "aiter",
    aiter_kernel(lambda: _probe.lib("aiter")),
    family="aiter",
    caps=aiter_caps(),
    requires=aiter_requires,
    check=_probe.library_check("aiter", imported_reasons),
    description="AMD AITER flash_attn_func (CK FlashAttention, pip amd-aiter); ROCm, fp16/bf16, no mask",
    kernel=True,
    aliases=("aiter_attn", "aiter_flash"),
)


# AITER's FlashAttention from the Hugging Face Hub (opt-in; see attnpatch/backends/hub.py): bf16 instances only.
hub.define_hub(
    "aiter_fa2_hub",
    aiter_kernel(hub.module("aiter_fa2_hub")),
    aiter_caps(dtypes=frozenset({torch.bfloat16}), priority=0),
    "AITER FlashAttention from kernels-community/aiter-flash-attn-ck (Hub, opt-in); ROCm, bf16",
    _probe.compiled_dropout_reasons,
)
