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

The Hub builds have the APIs of the libraries they package, so each is declared by its family's file (flash.py,
aiter.py, sage.py) with that family's kernel function and capabilities, through :func:`define_hub`; this module
holds what they share: the repositories, trust, pins and the download.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attnpatch import env
from attnpatch.backends import _probe
from attnpatch.backends._define import define
from attnpatch.core import registry
from attnpatch.core.call import BackendFn, CallSpec
from attnpatch.core.capabilities import Capabilities
from attnpatch.core.registry import Backend
from attnpatch.errors import BackendUnavailable, UnknownBackendError

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
        raise UnknownBackendError(f"{name!r} is not a Hub backend; Hub backends: {', '.join(sorted(KERNELS))}")
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
    get_kernel = _probe.lib("kernels").get_kernel
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


def forget_downloads() -> None:
    """Forget loaded kernels and remembered failures (the next call loads again)."""
    _modules.clear()
    _invalidate()


def reset() -> None:
    """Back to the start: trust follows ATTNPATCH_TRUST_HUB_KERNELS, default revisions, nothing loaded or failed."""
    global _trusted
    _trusted = None
    _pins.clear()
    _modules.clear()
    _invalidate()


def _invalidate() -> None:
    _failures.clear()
    registry.refresh()


def _requires(name: str) -> Callable[[], list[str]]:
    spec = KERNELS[name]

    @_probe.constant_for_compile  # see _probe.requires
    def reasons() -> list[str]:
        found = _probe.package_reasons("kernels", "kernels", spec.min_kernels)
        trust = [] if trusted() else [_trust_reason(name)]
        return found + trust + _probe.device_reasons(spec.device)

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


def module(name: str) -> Callable[[], Any]:
    """The kernel module of the Hub backend ``name``, as a library getter for a family's kernel function."""
    return lambda: load(name)


def define_hub(
    name: str, kernel: BackendFn, caps: Capabilities, description: str, *checks: Callable[[CallSpec], list[str]]
) -> Backend:
    """Declare the Hub backend ``name`` (its repository in :data:`KERNELS`) with a family's kernel function.

    Called by the family files (flash.py, aiter.py, sage.py) next to their pip backends: the availability
    (kernels installed, trust, device) and the per-call check (``checks``, then the download) are the Hub's.
    """
    return define(
        name,
        kernel,
        family="hub",
        caps=caps,
        requires=_requires(name),
        check=_check(name, *checks),
        description=description,
        kernel=True,
    )
