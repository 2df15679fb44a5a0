"""Attention kernels from the Hugging Face Hub, loaded with the ``kernels`` package (``kernels.get_kernel``).

Loading a Hub kernel downloads compiled code and runs it in this process, so nothing here is available until the
user opts in: ``ATTNPATCH_TRUST_HUB_KERNELS=1`` or ``attnpatch.backends.hub.trust_hub_kernels(True)``. Each kernel is
fetched at a pinned revision: by default the major-version branch (``v3``...) diffusers 0.42 was tested with, which
the kernels project keeps API-stable; ``pin_hub_kernel(name, "<commit sha>")`` pins an immutable commit instead.
``auto`` never picks a Hub backend (priority 0): it would download code the user did not name.

A kernel is fetched on the first call that needs it (or by ``load(name)``); a download that fails, e.g. offline
with nothing cached, becomes the reason the backend cannot serve the call: "the kernels package could not reach the
Hub: ...". A traced region cannot download, so under torch.compile a backend that was never loaded falls back with
a reason saying to call ``load(name)`` first.

The Hub builds have the APIs of the libraries they package, so the kernels and capabilities are those of flash.py,
aiter.py and sage.py (kernels-community/aiter-flash-attn-ck ships bf16 instances only; SageAttention3 for
Blackwell takes (batch, heads, seq, head_dim), head dims 64 and 128, derives its scale from the head dim and
subtracts the key mean in place).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attnpatch import env, registry
from attnpatch.backends import _kernels, aiter, flash, sage
from attnpatch.backends._kernels import KernelFn
from attnpatch.errors import BackendUnavailable
from attnpatch.registry import Backend, CallSpec, Capabilities, register

KERNELS_VERSION = "0.12"


@dataclass(frozen=True)
class HubKernel:
    """Where a Hub backend's code lives: repository, default revision and the function it calls."""

    repo_id: str
    revision: str
    function: str
    min_kernels: str = KERNELS_VERSION
    device: str = "cuda"


# Repositories and major versions as in diffusers 0.42 (attention_dispatch._HUB_KERNELS_REGISTRY).
KERNELS: dict[str, HubKernel] = {
    "flash_hub": HubKernel("kernels-community/flash-attn2", "v3", "flash_attn_func"),
    "flash_varlen_hub": HubKernel("kernels-community/flash-attn2", "v3", "flash_attn_varlen_func"),
    "_flash_3_hub": HubKernel("kernels-community/flash-attn3", "v1", "flash_attn_func"),
    "_flash_3_varlen_hub": HubKernel("kernels-community/flash-attn3", "v1", "flash_attn_varlen_func"),
    "flash_4_hub": HubKernel("kernels-community/flash-attn4", "v0", "flash_attn_func", min_kernels="0.12.3"),
    "aiter_fa2_hub": HubKernel("kernels-community/aiter-flash-attn-ck", "v1", "flash_attn_func", device="rocm"),
    "sage_hub": HubKernel("SageAttention/sage-attention", "v3", "sageattn"),
    "sage_blackwell_hub": HubKernel("SageAttention/sage-blackwell", "v1", "sageattn3_blackwell"),
}

_trusted: bool | None = None  # None: follow ATTNPATCH_TRUST_HUB_KERNELS
_pins: dict[str, str] = {}
_modules: dict[tuple[str, str], Any] = {}
_failures: dict[tuple[str, str], str] = {}
_backends: list[Backend] = []


def trust_hub_kernels(enabled: bool = True) -> None:
    """Allow (or forbid again) downloading and running attention kernels from the Hugging Face Hub.

    Same as ``ATTNPATCH_TRUST_HUB_KERNELS=1``, which it overrides. Nothing is downloaded until a Hub backend is
    selected and called.
    """
    global _trusted
    _trusted = bool(enabled)
    _invalidate()


def pin_hub_kernel(name: str, revision: str | None) -> None:
    """Fetch the Hub backend ``name`` at ``revision`` (a commit sha, tag or branch); None restores the default."""
    if name not in KERNELS:
        raise registry.UnknownBackendError(f"{name!r} is not a Hub backend; Hub backends: {', '.join(sorted(KERNELS))}")
    if revision is None:
        _pins.pop(name, None)
    else:
        _pins[name] = revision
    _invalidate()


def revision(name: str) -> str:
    """The revision the Hub backend ``name`` is fetched at."""
    return _pins.get(name, KERNELS[name].revision)


def trusted() -> bool:
    return env.trust_hub_kernels() if _trusted is None else _trusted


def load(name: str) -> Any:
    """The kernel module of the Hub backend ``name``, downloaded on first use; raises BackendUnavailable.

    Call it before torch.compile to have the kernel ready inside compiled code.
    """
    spec = KERNELS[name]
    key = (spec.repo_id, revision(name))
    module = _modules.get(key)
    if module is None:
        if not trusted():
            raise BackendUnavailable(_trust_reason(name))
        if key in _failures:
            raise BackendUnavailable(_failures[key])
        module = _modules[key] = _download(*key)
    if not hasattr(module, spec.function):
        raise BackendUnavailable(
            f"{key[0]}@{key[1]} has no {spec.function}: pin a revision that has it, "
            f"attnpatch.backends.hub.pin_hub_kernel({name!r}, '<revision>')"
        )
    return module


def _download(repo_id: str, rev: str) -> Any:
    get_kernel = _kernels.lib("kernels").get_kernel
    kwargs: dict[str, Any] = {"revision": rev}
    # kernels >= 0.14 refuses repositories of organisations it does not list as trusted unless told otherwise;
    # the user's opt-in above is that permission.
    if "trust_remote_code" in _parameters(get_kernel):
        kwargs["trust_remote_code"] = True
    try:
        return get_kernel(repo_id, **kwargs)
    except Exception as exc:  # whatever the Hub client raises, the backend must fall back with the reason
        if _unreachable(exc):
            message = (
                f"the kernels package could not reach the Hub: {type(exc).__name__}: {exc} (fetching "
                f"{repo_id}@{rev}; once downloaded it loads from the Hugging Face cache, also offline)"
            )
        else:
            message = f"the kernels package could not load {repo_id}@{rev}: {type(exc).__name__}: {exc}"
        _failures[(repo_id, rev)] = message
        raise BackendUnavailable(message) from exc


def _parameters(function: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


def _unreachable(exc: BaseException) -> bool:
    # huggingface_hub raises OSError subclasses (LocalEntryNotFoundError, OfflineModeIsEnabled) when it cannot reach
    # the Hub and has no cached copy; raw transport errors of httpx/requests are matched by name.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, OSError) or bool(names & {"ConnectError", "ConnectTimeout", "TimeoutException"})


def _trust_reason(name: str) -> str:
    return (
        f"downloads and runs code from the Hugging Face Hub ({KERNELS[name].repo_id}@{revision(name)}): opt in with "
        "ATTNPATCH_TRUST_HUB_KERNELS=1 or attnpatch.backends.hub.trust_hub_kernels(True)"
    )


def _invalidate() -> None:
    _failures.clear()
    for backend in _backends:
        backend._reasons = None
    registry._changed()


def _requires(name: str) -> Callable[[], list[str]]:
    spec = KERNELS[name]

    @_kernels.constant_for_compile  # see _kernels.requires
    def reasons() -> list[str]:
        found = _kernels.package_reasons("kernels", "kernels", spec.min_kernels)
        trust = [] if trusted() else [_trust_reason(name)]
        return found + trust + _kernels.device_reasons(spec.device)

    return reasons


def _check(name: str, *more: Callable[[CallSpec], list[str]]) -> Callable[[CallSpec], list[str]]:
    spec = KERNELS[name]

    def check(call: CallSpec) -> list[str]:
        reasons = [reason for extra in more for reason in extra(call)]
        if call.compiling:
            if (spec.repo_id, revision(name)) not in _modules:
                reasons.append(
                    f"{spec.repo_id}@{revision(name)} is not downloaded yet and torch.compile cannot download inside "
                    f"a traced region: call attnpatch.backends.hub.load({name!r}) before compiling"
                )
            return reasons
        try:
            load(name)
        except BackendUnavailable as exc:
            reasons.append(str(exc))
        return reasons

    return check


def _module(name: str) -> Callable[[], Any]:
    return lambda: load(name)


def sage3_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """sageattn3_blackwell on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""
    heads, heads_kv = query.shape[2], key.shape[2]
    if heads_kv != heads:
        key = key.repeat_interleave(heads // heads_kv, dim=2)
        value = value.repeat_interleave(heads // heads_kv, dim=2)
    # (batch, heads, seq, head_dim), the layout it takes. The key is always copied: the kernel subtracts its mean
    # in place, and a caller's key may already be (batch, heads, seq, head_dim) in memory, where no copy is made.
    q, v = (t.transpose(1, 2).contiguous() for t in (query, value))
    k = key.transpose(1, 2).clone(memory_format=torch.contiguous_format)
    return load("sage_blackwell_hub").sageattn3_blackwell(q, k, v, is_causal=is_causal).transpose(1, 2)


def _sage3_head_dims(call: CallSpec) -> list[str]:
    # Its own code: "Unsupported Headdim" (sdpa instead) at >= 256; diffusers measured 64 and 128 as the only dims
    # that compile and run (smaller ones are rejected, non powers of two fail in the Triton pre-pass).
    if call.head_dim not in (64, 128):
        return [f"sageattn3_blackwell takes head_dim 64 or 128, got {call.head_dim}"]
    return []


def _hub(
    name: str, kernel: KernelFn, caps: Capabilities, description: str, *checks: Callable[[CallSpec], list[str]]
) -> None:
    backend = Backend(
        name,
        _kernels.external(name, kernel),
        family="hub",
        caps=caps,
        requires=_requires(name),
        check=_check(name, *checks),
        builtin=True,
        description=description,
    )
    _backends.append(backend)
    register(backend)


_hub(
    "flash_hub",
    flash.flash2_kernel(_module("flash_hub")),
    flash.flash2_caps(flash.NO_MASK, priority=0),
    "FlashAttention-2 from kernels-community/flash-attn2 (Hub, opt-in)",
    _kernels.compiled_dropout_reasons,
)
_hub(
    "flash_varlen_hub",
    flash.flash2_varlen_kernel(_module("flash_varlen_hub")),
    flash.flash2_caps(flash.KEY_PADDING, priority=0),
    "FlashAttention-2 varlen from kernels-community/flash-attn2 (Hub, opt-in): key-padding masks",
    _kernels.compiled_dropout_reasons,
)
_hub(
    "_flash_3_hub",
    flash.flash3_kernel(_module("_flash_3_hub")),
    flash.flash3_caps(flash.NO_MASK, priority=0),
    "FlashAttention-3 from kernels-community/flash-attn3 (Hub, opt-in); sm90",
)
_hub(
    "_flash_3_varlen_hub",
    flash.flash3_varlen_kernel(_module("_flash_3_varlen_hub")),
    flash.flash3_caps(flash.KEY_PADDING, priority=0),
    "FlashAttention-3 varlen from kernels-community/flash-attn3 (Hub, opt-in): key-padding masks; sm90",
)
_hub(
    "flash_4_hub",
    # FlashAttention-4 (flash_attn/cute/interface.py): the FA3 call; "Supported: 9.x, 10.x, 11.x", hdim <= 256 and
    # a multiple of 8, fp16/bf16, no dropout, causal aligned bottom-right like every FlashAttention.
    flash.flash3_kernel(_module("flash_4_hub")),
    flash.flash3_caps(flash.NO_MASK, priority=0, max_compute_capability=(11, 0)),
    "FlashAttention-4 (CuTe DSL) from kernels-community/flash-attn4 (Hub, opt-in); sm90-sm110",
)
_hub(
    "aiter_fa2_hub",
    aiter.aiter_kernel(_module("aiter_fa2_hub")),
    aiter.aiter_caps(dtypes=frozenset({torch.bfloat16}), priority=0),
    "AITER FlashAttention from kernels-community/aiter-flash-attn-ck (Hub, opt-in); ROCm, bf16",
    _kernels.compiled_dropout_reasons,
)
_hub(
    "sage_hub",
    sage.sage_kernel("sageattn", _module("sage_hub")),
    sage.sage_caps(priority=0),
    "SageAttention from SageAttention/sage-attention (Hub, opt-in); INT8, lossy",
    sage.sage_check("sageattn", archs=sage.SAGEATTN_ARCHS, package=False),
)
_hub(
    "sage_blackwell_hub",
    sage3_kernel,
    sage.sage_caps(
        scale=False,
        min_compute_capability=(10, 0),
        max_compute_capability=(12, 0),
        tolerance={torch.float16: (0.25, 0.25), torch.bfloat16: (0.25, 0.25)},  # FP4
        priority=0,
    ),
    "SageAttention3 (FP4) for Blackwell from SageAttention/sage-blackwell (Hub, opt-in); lossy",
    lambda call: _kernels.capability_in(call, ((10, 0), (12, 0)), "the architectures it is built for"),
    lambda call: _kernels.same_length_causal(call, "SageAttention3"),
    _sage3_head_dims,
)
