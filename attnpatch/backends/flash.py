"""FlashAttention 2 (``flash_attn``), 3 (``flash_attn_interface``) and 4 (``flash_attn.cute``), dense and varlen.

What each kernel takes, from the libraries' docstrings and source (flash_attn/flash_attn_interface.py,
hopper/flash_attn_interface.py and hopper/flash_api.cpp, flash_attn/cute/interface.py, README):

- q: (batch, seqlen_q, nheads, headdim), k/v: (batch, seqlen_k, nheads_k, headdim): the dispatcher's layout, so no
  transpose. nheads % nheads_k == 0 (GQA/MQA) is native. fp16/bf16 only.
- FA2: Ampere or newer (sm80+), head dims up to 256 (the Python wrapper pads to a multiple of 8), dropout, backward,
  ``deterministic`` backward switch.
- FA3: head dim a multiple of 8 up to 256, no dropout; its ``flash_attn_func`` returned ``(out, lse)`` in the beta
  and ``out`` since. It runs on sm80 and sm90 (v2.8.3 hopper/flash_api.cpp l. 676-690: ``major >= 8``, "FlashAttention
  only supports Ampere GPUs or newer"; setup.py builds the sm80 kernels unless FLASH_ATTENTION_DISABLE_SM80; the
  ``ARCH_SWITCH`` of static_switch.h l. 138-150 sends arch >= 90 to sm_90a code, which has no image for sm100 or
  sm120). fp8 and head_dim_v != head_dim are Hopper only; attnpatch passes neither (fp16/bf16, equal head dims).
- FA4 (pip ``flash-attn-4``, pre-releases only): ``flash_attn_func(q, k, v, qv=None, ..., softmax_scale=None,
  causal=False, ...)`` returns ``(out, lse)``; from 4.0.0b9 on ``qv`` is the 4th positional, so everything is
  passed by keyword. No dropout. Architectures and head dims per release: see :func:`flash4_reasons`.
- ``causal=True`` is aligned to the bottom-right corner of the score matrix when seqlen_q != seqlen_k, while SDPA
  (and so the dispatcher) aligns it top-left: such calls get a reason (``causal_cross=False``) instead of an answer
  that differs silently.
- No attention mask. Key-padding masks go to the varlen kernels: keys packed with cu_seqlens, every query row kept,
  max_seqlen_k = the padded length (an upper bound; the exact max would cost a device sync).

The Hub builds of the same libraries (``flash_hub``, ``flash_varlen_hub``, ``_flash_3_hub``, ``_flash_3_varlen_hub``,
``flash_4_hub``; loading in attnpatch/backends/hub.py) are declared next to the pip ones: same kernel function,
capabilities and checks, another library module.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from attnpatch.backends import _extras, _probe, _varlen, hub
from attnpatch.backends._define import define
from attnpatch.core.call import MASK_KEY_PADDING, MASK_NONE, BackendFn, CallSpec, SdpaArgs
from attnpatch.core.capabilities import Capabilities
from attnpatch.core.versions import distribution_version

if TYPE_CHECKING:
    from typing_extensions import Unpack

FLASH_VERSION = "2.6.3"
FLASH_HINT = " --no-build-isolation"
FA3_HINT = (
    "build FlashAttention-3 from source: git clone https://github.com/Dao-AILab/flash-attention && "
    "cd flash-attention/hopper && python setup.py install"
)
FA4_MODULE = "flash_attn.cute"
FA4_VERSION = "4.0.0b5"  # the first release whose forward runs on 8.x-12.x and that validates its head dims
FA4_MIN_BETA = 5
# PyPI has flash-attn-4 as pre-releases only: a specifier that names one lets pip take it without --pre.
FA4_REQUIREMENT = f"flash-attn-4>={FA4_VERSION}"

NO_MASK = frozenset({MASK_NONE})
KEY_PADDING = frozenset({MASK_NONE, MASK_KEY_PADDING})


def flash_kernel(library: Callable[[], Any], *, version: int = 2, varlen: bool = False) -> BackendFn:
    """``flash_attn_func`` (``flash_attn_varlen_func`` with ``varlen``) of the module ``library()`` returns.

    version 2: FlashAttention-2, with dropout and the ``deterministic`` backward switch. version 3 and 4: no
    dropout; FA3's beta returned ``(out, lse)``, later releases ``out``, FA4 ``(out, lse)``: a tuple has its
    output taken. Everything but q, k, v is passed by keyword (FA4's 4th positional is ``qv``).
    varlen: key-padding masks as packed keys (see attnpatch/backends/_varlen.py).
    """

    def flash(
        *args: Unpack[SdpaArgs],
        softcap: float | None = None,
        window: tuple[int, int] | None = None,
        sinks: torch.Tensor | None = None,
        return_lse: bool = False,
    ) -> Any:
        """q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim) -> like q; with return_lse
        (out, lse (batch, seq_q, heads) float32)."""
        query, key, value, attn_mask, dropout_p, is_causal, scale, _ = args
        kwargs: dict[str, Any] = {"softmax_scale": scale, "causal": is_causal}
        if version == 2:
            kwargs.update(dropout_p=dropout_p, deterministic=_probe.deterministic())
        wants_lse = return_lse or sinks is not None
        if softcap is not None or window is not None or wants_lse:  # the later arguments: only when given
            kwargs.update(_extra_kwargs(version, softcap, window, wants_lse))
        module = library()
        if varlen:
            # flash-attn 2.8.3's ROCm Triton backend returns the varlen lse (total_q, heads), CUDA (heads, total_q).
            rows_first = wants_lse and bool(
                getattr(getattr(module, "flash_attn_interface", None), "USE_TRITON_ROCM", 0)
            )
            result = _varlen.run_varlen(
                module.flash_attn_varlen_func,
                query,
                key,
                value,
                attn_mask,
                lse=wants_lse,
                lse_rows_first=rows_first,
                **kwargs,
            )
            out, lse = result if wants_lse else (result, None)
        else:
            result = module.flash_attn_func(query, key, value, **kwargs)
            out = result[0] if isinstance(result, tuple) else result
            lse = _extras.lse_bhs(result[1]) if wants_lse else None
        if lse is None:
            return out
        if sinks is not None:
            out = _extras.add_sinks(out, lse, sinks)
        return (out, lse) if return_lse else out

    flash.__name__ = flash.__qualname__ = f"flash{'' if version == 2 else version}{'_varlen' if varlen else ''}"
    return flash


def _extra_kwargs(version: int, softcap: float | None, window: tuple[int, int] | None, lse: bool) -> dict[str, Any]:
    # flash-attn 2 (2.6.0+: softcap; 2.3.0+: window_size) and FA3 take window_size (left, right) with -1 unbounded
    # and return (out, softmax_lse (batch, heads, seq_q), ...) with return_attn_probs; FA4 takes None for unbounded
    # and returns (out, lse) always, the lse only with return_lse (or inputs that require grad).
    kwargs: dict[str, Any] = {}
    if softcap is not None:
        kwargs["softcap"] = softcap
    if window is not None:
        kwargs["window_size"] = window if version < 4 else tuple(None if side < 0 else side for side in window)
    if lse:
        kwargs["return_lse" if version == 4 else "return_attn_probs"] = True
    return kwargs


# What every FlashAttention kernel serves of the later arguments: soft-capping and windows in the kernel (a window
# aligned bottom-right like its causal mask, so only for seq_q == seq_kv: causal_cross=False refuses the rest), the
# lse without a gradient (the autograd functions' backward ignores it), sinks from the lse (forward only: the
# check refuses them when inputs require grad). Varlen kernels take no window: keys packed with their padding
# removed move the window.
EXTRAS: dict[str, Any] = {"softcap": True, "window": True, "sinks": True, "return_lse": True, "lse_grad": False}
VARLEN_EXTRAS: dict[str, Any] = {"window": False}


def extras_reasons(call: CallSpec) -> list[str]:
    """Per-call rules of the later arguments on every FlashAttention kernel (pip and Hub)."""
    reasons = []
    if call.sinks and call.needs_grad:
        reasons.append("serves sinks from its lse, which has no gradient (sinks with inputs that require grad)")
    if (call.softcap or call.window) and call.device_type == "cuda" and _probe.amd_gpu():
        # flash-attn 2.8.3's ROCm Triton backend (flash_attn_triton_amd/interface_fa.py fwd) passes neither softcap
        # nor window_size to its kernels: the result would be unmodified attention.
        reasons.append("ignores softcap and window_size on AMD GPUs (flash-attn 2.8.3's ROCm Triton backend)")
    return reasons


# What FlashAttention-2 serves; FlashAttention-3 (and 4) differ as FA3 says. Shared with the Hub builds below.
FA2 = dataclasses.replace(
    _probe.FUSED_CUDA, max_head_dim=256, causal_cross=False, min_compute_capability=(8, 0), **EXTRAS
)
FA3 = dataclasses.replace(
    FA2,
    head_dim_multiple=8,
    dropout=False,
    deterministic=False,  # its backward switch is not forwarded: the beta and current signatures differ
    min_compute_capability=(8, 0),  # "major >= 8", sm80 kernels built (see the module docstring)
    max_compute_capability=(9, 0),  # sm_90a code only above: no kernel image for sm100/sm120
)


def flash2_caps(masks: frozenset[str], priority: int, **overrides: Any) -> Capabilities:
    """What FlashAttention-2 serves with ``masks`` at ``priority`` (shared with flash_hub / flash_varlen_hub)."""
    extras = VARLEN_EXTRAS if MASK_KEY_PADDING in masks else {}
    return dataclasses.replace(FA2, masks=masks, priority=priority, **{**extras, **overrides})


def flash3_caps(masks: frozenset[str], priority: int, **overrides: Any) -> Capabilities:
    """What FlashAttention-3 serves (shared with _flash_3_hub / _flash_3_varlen_hub)."""
    extras = VARLEN_EXTRAS if MASK_KEY_PADDING in masks else {}
    return dataclasses.replace(FA3, masks=masks, priority=priority, **{**extras, **overrides})


# ----- FlashAttention-4 (flash_attn/cute/interface.py), shared by flash_4 and flash_4_hub -----------------------

# What every FA4 release serves; the rest depends on the architecture and the release (flash4_reasons).
FA4 = dataclasses.replace(
    FA3,
    masks=NO_MASK,
    min_head_dim=8,
    head_dim_multiple=1,  # both head dims are checked, per architecture, in flash4_reasons
    max_head_dim=512,  # (512, 512) / (64, 512) on sm100/sm110; the per-architecture limits are in flash4_reasons
    same_v_head_dim=False,  # e.g. (192, 128) on sm100, any pair of 8-256 on sm90
    min_compute_capability=(8, 0),
    max_compute_capability=None,  # 12.x included: checked per release in flash4_reasons
)
FA4_ALIGNMENT = 8  # _flash_attn_fwd: alignment = 16 // element size, for fp16/bf16

# (head_dim, head_dim_v) beyond 8-128 that _validate_head_dims accepts on sm100/sm110, with the first PyPI release
# (4.0.0bN) that has each: read from the wheels b3-b5, b7-b20, b25, b27, b28, b30, b36 and b40.
SM100_SHAPES = {(192, 128): 5, (64, 512): 9, (256, 256): 11, (512, 512): 16}


def flash4_release() -> str | None:
    """The installed flash-attn-4's version, from its metadata; None without (a source tree, a test fake).

    Not ``flash_attn.cute.__version__``: 4.0.0b40 sets it from the metadata of "fa4", a name it is not installed
    under, so it reads "0.0.0".
    """
    return distribution_version("flash-attn-4")


def _beta(release: str | None) -> float | None:
    """4.0.0b40 -> 40; a later 4.x (rc, final) -> inf; an earlier major (PyPI's 0.0.1 placeholder) -> 0; None for a
    build of unknown release."""
    match = re.match(r"(\d+)\.\d+\.\d+(?:b(\d+))?", release or "")
    if match is None:
        return None
    if int(match[1]) != 4:
        return math.inf if int(match[1]) > 4 else 0.0
    return float(match[2]) if match[2] is not None else math.inf


@_probe.constant_for_compile  # see _probe.requires
def flash4_requires() -> list[str]:
    """Why the pip FlashAttention-4 cannot run here: not installed, too old, no GPU.

    Reads metadata only: importing flash_attn.cute imports flash_attn, which may be FlashAttention-2's package
    (FA4 installs into the same namespace), with its CUDA extension.
    """
    release = flash4_release()
    if release is None and FA4_MODULE not in sys.modules:
        # FlashAttention-2's wheel carries an early flash_attn/cute of its own: only flash-attn-4 is FA4.
        reasons = [f"{FA4_MODULE} not installed: pip install '{FA4_REQUIREMENT}' (FlashAttention-4)"]
    elif release is not None and (_beta(release) or 0) < FA4_MIN_BETA:
        reasons = [f"flash-attn-4 version {release} < {FA4_VERSION}: pip install -U '{FA4_REQUIREMENT}'"]
    else:
        reasons = []
    return reasons + _probe.device_reasons("nvidia")  # CuTe DSL: NVIDIA GPUs only


def flash4_reasons(call: CallSpec, release: str | None) -> list[str]:
    """Why FlashAttention-4 of ``release`` (None: unknown, e.g. a Hub build) cannot serve ``call`` on its GPU.

    From flash_attn/cute/interface.py of the PyPI wheels: the forward asserts ``arch // 10 in [8, 9, 10, 11, 12]``
    from 4.0.0b5 on ([9, 10, 11] in b3/b4), the backward ``[9, 10, 11, 12]``; ``_validate_head_dims`` (b5+) allows on
    sm90 8-256 for both head dims, on sm100/sm110 8-128 for both or the shapes of :data:`SM100_SHAPES`, each divisible
    by 16 // element size. On 8.x and 12.x it checks nothing; attnpatch keeps FlashAttention-2's 256 there and the
    multiple of 8 their kernels' (uncalled) ``can_implement`` asks for. A build of unknown release gets what every
    release serves: forward and backward on 9.x-11.x, the 8-256 (sm90) and 8-128 (sm100/sm110) ranges.
    """
    if call.device_type != "cuda":
        return []  # the device reason is given by the capabilities already
    if _probe.amd_gpu():  # an AMD GPU reports a compute capability too (9.4 for MI300)
        return [f"FlashAttention-4 (CuTe DSL) {_probe.NOT_NVIDIA}"]
    beta = _beta(release)
    name = f"FlashAttention-4 {release}" if release else "FlashAttention-4 of unknown release"
    cc = _probe.compute_capability(call.device_index)
    major, found = cc[0], f"found {cc[0]}.{cc[1]}"
    forward, backward = ((8, 12), (9, 12)) if beta is not None else ((9, 11), (9, 11))
    if not forward[0] <= major <= forward[1]:
        return [f"{name} runs on compute capability {forward[0]}.x-{forward[1]}.x, {found}"]
    reasons = []
    if call.needs_grad and not backward[0] <= major <= backward[1]:
        reasons.append(f"{name} has its backward on compute capability {backward[0]}.x-{backward[1]}.x only, {found}")
    dims = (call.head_dim, call.head_dim_v)
    aligned = all(dim % FA4_ALIGNMENT == 0 for dim in dims)
    if major == 9:
        served, rule = aligned and all(8 <= dim <= 256 for dim in dims), "8-256"
    elif major in (10, 11):
        extra = [shape for shape, since in SM100_SHAPES.items() if beta is not None and beta >= since]
        served = aligned and (all(8 <= dim <= 128 for dim in dims) or dims in extra)
        rule = ", ".join(["8-128", *(f"({q}, {v})" for q, v in extra)])
    else:  # 8.x, 12.x
        served, rule = aligned and all(8 <= dim <= 256 for dim in dims), "8-256"
    if not served:
        reasons.append(
            f"{name} takes (head_dim, head_dim_v) {rule}, divisible by {FA4_ALIGNMENT}, on compute capability "
            f"{major}.x, got {dims}"
        )
    return reasons


def flash4_check(release: Callable[[], str | None]) -> Callable[[CallSpec], list[str]]:
    """The per-call rules of FlashAttention-4 for the build whose release ``release()`` returns."""
    return lambda call: flash4_reasons(call, release())


def _module(name: str) -> Callable[[], Any]:
    return lambda: _probe.lib(name)


# What every pip FlashAttention backend declares besides its kernel: the family, availability and the import check.
_FA2: dict[str, Any] = {
    "family": "flash",
    "requires": _probe.requires("flash_attn", "flash-attn", FLASH_VERSION, FLASH_HINT),
    "check": _probe.library_check("flash_attn", extras_reasons),
    "kernel": True,
}
_FA3: dict[str, Any] = {
    "family": "flash",
    "requires": _probe.requires("flash_attn_interface", "flash-attn-3", hint=FA3_HINT, device="nvidia"),
    "check": _probe.library_check("flash_attn_interface", extras_reasons),
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

define(
    "flash_4",
    flash_kernel(_module(FA4_MODULE), version=4),
    # Below _flash_3 (60): on Hopper both run and FA3 is the kernel written for it (FA4 is written for Blackwell;
    # its sm90 path came later), while on sm100/sm120, where FA3 has no kernel image, FA4 is first (above cuDNN, 45).
    caps=dataclasses.replace(FA4, priority=58),
    description="FlashAttention-4 flash_attn.cute.flash_attn_func (pip flash-attn-4); sm80-sm120, forward-only on 8.x",
    aliases=("flash4", "fa4", "flash_attn_4"),
    family="flash",
    requires=flash4_requires,
    # The release is read at each check (not once here), so an upgrade in this process counts after refresh().
    check=_probe.library_check(FA4_MODULE, flash4_check(lambda: flash4_release()), extras_reasons),
    kernel=True,
)


# ----- the same kernels from the Hugging Face Hub (opt-in; see attnpatch/backends/hub.py) -----------------------

hub.define_hub(
    "flash_hub",
    flash_kernel(hub.module("flash_hub")),
    flash2_caps(NO_MASK, priority=0),
    "FlashAttention-2 from kernels-community/flash-attn2 (Hub, opt-in)",
    _probe.compiled_dropout_reasons,
    extras_reasons,
)
hub.define_hub(
    "flash_varlen_hub",
    flash_kernel(hub.module("flash_varlen_hub"), varlen=True),
    flash2_caps(KEY_PADDING, priority=0),
    "FlashAttention-2 varlen from kernels-community/flash-attn2 (Hub, opt-in): key-padding masks",
    _probe.compiled_dropout_reasons,
    extras_reasons,
)
hub.define_hub(
    "_flash_3_hub",
    flash_kernel(hub.module("_flash_3_hub"), version=3),
    flash3_caps(NO_MASK, priority=0),
    "FlashAttention-3 from kernels-community/flash-attn3 (Hub, opt-in); sm90",
    extras_reasons,
)
hub.define_hub(
    "_flash_3_varlen_hub",
    flash_kernel(hub.module("_flash_3_varlen_hub"), version=3, varlen=True),
    flash3_caps(KEY_PADDING, priority=0),
    "FlashAttention-3 varlen from kernels-community/flash-attn3 (Hub, opt-in): key-padding masks; sm90",
    extras_reasons,
)
hub.define_hub(
    "flash_4_hub",
    flash_kernel(hub.module("flash_4_hub"), version=4),
    dataclasses.replace(FA4, priority=0),
    "FlashAttention-4 (CuTe DSL) from kernels-community/flash-attn4 (Hub, opt-in); release unknown: sm90-sm110",
    flash4_check(lambda: None),  # which FA4 release the Hub build packages is not known: the rules of every release
    extras_reasons,
)
