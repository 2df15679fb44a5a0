"""Attention kernels from the Hugging Face Hub, loaded with the ``kernels`` package (``kernels.get_kernel``).

Sources. Each backend loads what diffusers 0.42.1 loads for the backend of the same name
(src/diffusers/models/attention_dispatch.py ``_HUB_KERNELS_REGISTRY``: ``get_kernel(repo_id, revision=None,
version=N)``; tests/backends/test_hub_backend.py compares :data:`KERNELS` with it). ``version=N`` loads the newest
commit of the API-stable branch ``vN`` (kernels 0.19.1 ``_versions.py``: ``list_repo_refs(repo_id,
repo_type="kernel")``). For its own ``flash_attention_2/3/4`` (left to transformers by attnpatch), transformers
5.25 (modeling_flash_attention_utils.py ``FLASH_ATTN_KERNEL_FALLBACK``, ``FLASH_ATTN_KERNEL_VERSIONS``) falls back to
kernels-community/flash-attn2 version 4, kernels-community/vllm-flash-attn3 version 1, kernels-community/flash-attn4
version 1 (ROCm: kernels-community/aiter-flash-attn version 2); the backends here follow diffusers.
``sage_blackwell_hub`` is SageAttention3 (thu-ml/SageAttention ``sageattention3_blackwell/sageattn3/api.py`` and
``blackwell/api.cu``; the kernels-community/sage-blackwell card): sm_120 only, head dims 64/128, equal query and key
heads, attn_mask and scale ignored, key mean subtracted in place (rules in sage.py).

Trust. A Hub kernel is compiled code run in this process, so nothing here is available until the user opts in:
``ATTNPATCH_TRUST_HUB_KERNELS`` set to 1, true, yes or on (any case), or ``trust_hub_kernels(True)``; any other value
is no, and one that is not a recognised no is warned about once. The kernels package keeps a second gate (>= 0.14,
``_check_trust_remote_code``): it loads only repositories whose organisation the Hub marks as a trusted kernel
publisher. attnpatch widens that only for repositories the user names (:func:`trust_remote_code` or
``ATTNPATCH_HUB_TRUST_REMOTE_CODE=org/repo,org2/repo2``), passing ``trust_remote_code=[repo_id]`` (kernels >= 0.17,
an allow-list) or ``True`` (0.14-0.16 ignored a list) for that repository's download only.

Revisions: a pin (:func:`pin_hub_kernel`) wins; else the commit ``python -m attnpatch hub lock`` recorded in
:func:`lock_path`; else the version branch. Downloads: on the first call that needs one (or ``load(name)``), and
only for a call the backend can serve (capabilities and the family's rules first). A failed download is the reason
the backend cannot serve, remembered per repository and revision. ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are
honoured even when set after huggingface_hub read them at its import: the download runs with its offline switch on,
so it loads from the cache or fails at once. A traced region cannot download: under torch.compile a backend never
loaded falls back with a reason saying to call ``load(name)`` first. ``auto`` never picks a Hub backend.

The Hub builds have the APIs of the libraries they package, so each is declared by its family's file (flash.py,
aiter.py, sage.py) with that family's kernel function and capabilities, through :func:`define_hub`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnpatch import env
from attnpatch.backends import _probe
from attnpatch.backends._define import define
from attnpatch.core import registry
from attnpatch.core.call import BackendFn, CallSpec
from attnpatch.core.capabilities import Capabilities, capability_reasons
from attnpatch.core.registry import Backend
from attnpatch.core.versions import installed_version, version_tuple
from attnpatch.errors import AttnpatchWarning, BackendUnavailable, UnknownBackendError

KERNELS_VERSION = "0.12"
# kernels 0.17 made trust_remote_code=[repo ids] an allow-list; 0.14-0.16 warned about a list and ignored it.
ALLOW_LIST_FROM = (0, 17)

TRUST_VARIABLE = "ATTNPATCH_TRUST_HUB_KERNELS"
REMOTE_CODE_VARIABLE = "ATTNPATCH_HUB_TRUST_REMOTE_CODE"
YES = ("1", "true", "yes", "on")
NO = ("", "0", "false", "no", "off")
# huggingface_hub.constants: HF_HUB_OFFLINE = _is_true(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), read at its import.
HF_TRUE = ("1", "ON", "YES", "TRUE")

LOCK_SCHEMA = "attnpatch.hub-lock/1"
LOCK_FILE = "hub-lock.json"

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_SHA = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubKernel:
    """Where a Hub backend's code lives: repository, version (the branch ``v<version>``) and the function it calls."""

    repo_id: str
    version: int
    function: str
    min_kernels: str = KERNELS_VERSION
    device: str = "cuda"

    @property
    def branch(self) -> str:
        """The branch ``get_kernel(repo_id, version=N)`` loads: ``vN``."""
        return f"v{self.version}"


# diffusers 0.42.1 attention_dispatch._HUB_KERNELS_REGISTRY (repo_id, version, function_attr), backend by backend.
KERNELS: dict[str, HubKernel] = {
    "flash_hub": HubKernel("kernels-community/flash-attn2", 3, "flash_attn_func"),
    "flash_varlen_hub": HubKernel("kernels-community/flash-attn2", 3, "flash_attn_varlen_func"),
    "_flash_3_hub": HubKernel("kernels-community/flash-attn3", 1, "flash_attn_func"),
    "_flash_3_varlen_hub": HubKernel("kernels-community/flash-attn3", 1, "flash_attn_varlen_func"),
    "flash_4_hub": HubKernel("kernels-community/flash-attn4", 0, "flash_attn_func", min_kernels="0.12.3"),
    "aiter_fa2_hub": HubKernel("kernels-community/aiter-flash-attn-ck", 1, "flash_attn_func", device="rocm"),
    "sage_hub": HubKernel("SageAttention/sage-attention", 3, "sageattn"),
    "sage_blackwell_hub": HubKernel("SageAttention/sage-blackwell", 1, "sageattn3_blackwell"),
}

_trusted: bool | None = None  # None: follow ATTNPATCH_TRUST_HUB_KERNELS
_remote_code: frozenset[str] | None = None  # None: follow ATTNPATCH_HUB_TRUST_REMOTE_CODE
_pins: dict[str, str] = {}
_modules: dict[tuple[str, str], Any] = {}  # (repo_id, revision) -> kernel module
_failures: dict[tuple[str, str], str] = {}
_loaded: dict[str, Any] = {}  # backend name -> kernel module: the per-call path is one dict lookup
_lock_entries: dict[str, dict[str, str]] | None = None  # the lock file, read on first use
_warned: set[str] = set()
_offline_switch = threading.Lock()


# ----- trust ------------------------------------------------------------------------------------------------------


def trust_hub_kernels(enabled: bool = True) -> None:
    """Allow (or forbid again) downloading and running attention kernels from the Hugging Face Hub.

    Same as ``ATTNPATCH_TRUST_HUB_KERNELS=1``, which it overrides. Nothing is downloaded until a Hub backend is
    selected and called.
    """
    global _trusted
    _trusted = bool(enabled)
    _invalidate()


def trusted() -> bool:
    """Whether the user opted in to Hub kernels (:func:`trust_hub_kernels`, else ATTNPATCH_TRUST_HUB_KERNELS)."""
    return _trust_from_environment() if _trusted is None else _trusted


def _trust_from_environment() -> bool:
    # Fails closed: only an explicit yes runs downloaded code. A typo ("ture"), or a value meant as no ("disable",
    # "never", "n") is no, and the user hears about it once instead of getting the opposite of what they wrote.
    value = env.raw(TRUST_VARIABLE)
    spelled = (value or "").lower()
    if spelled in YES:
        return True
    if spelled not in NO:
        _warn_once(
            f"{TRUST_VARIABLE}={value!r} is not a recognised value, so Hub kernels stay off: set it to "
            f"{', '.join(YES)} (any case) to opt in, or {', '.join(repr(n) for n in NO)} to stay out"
        )
    return False


def trust_remote_code(repo_ids: Iterable[str] | str | None) -> None:
    """Let kernels load these repositories (``"org/name"``) although the Hub does not mark their publisher trusted.

    Only these: no other repository gets that permission. Overrides ATTNPATCH_HUB_TRUST_REMOTE_CODE; None follows it.
    """
    global _remote_code
    if repo_ids is None:
        _remote_code = None
    else:
        names = [repo_ids] if isinstance(repo_ids, str) else list(repo_ids)
        bad = [name for name in names if not isinstance(name, str) or not _REPO_ID.fullmatch(name)]
        if bad:
            raise ValueError(f"trust_remote_code takes Hub repository ids like 'org/name', got {bad!r}")
        _remote_code = frozenset(names)
    _invalidate()


def remote_code_repositories() -> frozenset[str]:
    """The repositories kernels may load from any publisher (:func:`trust_remote_code`, else the variable)."""
    if _remote_code is not None:
        return _remote_code
    listed = [part.strip() for part in (env.raw(REMOTE_CODE_VARIABLE) or "").split(",") if part.strip()]
    bad = [name for name in listed if not _REPO_ID.fullmatch(name)]
    if bad:
        _warn_once(
            f"{REMOTE_CODE_VARIABLE} lists Hub repositories as org/name separated by commas; ignored: "
            + ", ".join(repr(name) for name in bad)
        )
    return frozenset(name for name in listed if name not in bad)


def _trust_argument(get_kernel: Callable[..., Any], repo_id: str) -> dict[str, Any]:
    if repo_id not in remote_code_repositories() or "trust_remote_code" not in _parameters(get_kernel):
        return {}
    found = version_tuple(installed_version("kernels", "kernels") or "0")
    return {"trust_remote_code": [repo_id] if found >= ALLOW_LIST_FROM else True}


def _trust_reason(name: str) -> str:
    return (
        f"downloads and runs code from the Hugging Face Hub ({KERNELS[name].repo_id}@{revision(name)}): opt in with "
        f"{TRUST_VARIABLE}=1 or attnpatch.backends.hub.trust_hub_kernels(True)"
    )


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, AttnpatchWarning, stacklevel=3)


# ----- revisions: pins and the lock file --------------------------------------------------------------------------


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
    """The revision the Hub backend ``name`` is fetched at: its pin, its locked commit, or its version branch."""
    return _source(name)[1]


def _source(name: str) -> tuple[str, str, dict[str, Any]]:
    # (repository, revision, the get_kernel arguments that fetch it)
    spec = KERNELS[name]
    pinned = _pins.get(name)
    if pinned is not None:
        return spec.repo_id, pinned, {"revision": pinned}
    sha = locked(name)
    if sha is not None:
        return spec.repo_id, sha, {"revision": sha}
    return spec.repo_id, spec.branch, {"version": spec.version}


def lock_path() -> Path:
    """The lock file: ``$ATTNPATCH_CACHE_DIR/hub-lock.json``, else in the user cache dir (beside the autotune cache)."""
    configured = env.raw("ATTNPATCH_CACHE_DIR")
    if configured:
        return Path(configured).expanduser() / LOCK_FILE
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "attnpatch" / "Cache" / LOCK_FILE
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "attnpatch" / LOCK_FILE
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnpatch" / LOCK_FILE


def locked(name: str) -> str | None:
    """The commit the lock file fixes for the Hub backend ``name``, or None (no lock file, or not this version)."""
    global _lock_entries
    if _lock_entries is None:
        _lock_entries = _parse_lock(lock_path())
    entry = _lock_entries.get(name)
    if entry is None:
        return None
    spec = KERNELS[name]
    if (entry["repo_id"], entry["revision"]) != (spec.repo_id, spec.branch):
        # The lock was written for another repository or version (an older attnpatch): loading its commit would
        # run code this version was not declared for.
        _warn_once(
            f"{lock_path()} locks {name} to {entry['repo_id']}@{entry['revision']}, but this attnpatch loads "
            f"{spec.repo_id}@{spec.branch}: ignored; run python -m attnpatch hub lock again"
        )
        return None
    return entry["sha"]


def _parse_lock(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != LOCK_SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, expected {LOCK_SCHEMA!r}")
        entries = {
            name: {key: entry[key] for key in ("repo_id", "revision", "sha")} for name, entry in data["kernels"].items()
        }
        for name, entry in entries.items():
            if not all(isinstance(value, str) for value in entry.values()) or not _SHA.fullmatch(entry["sha"]):
                raise ValueError(f"{name}: not a repo_id, revision and 40-hex sha: {entry!r}")
        return entries
    except Exception as exc:  # a damaged lock file must not stop the process: it is ignored, loudly
        _warn_once(f"ignoring the Hub lock file {path}: {type(exc).__name__}: {exc}; run python -m attnpatch hub lock")
        return {}


def write_lock(kernels: dict[str, dict[str, str]], path: str | os.PathLike[str] | None = None) -> Path:
    """Write the lock file (default :func:`lock_path`): ``kernels`` maps backend names to their repo_id, revision
    (the branch) and sha. What ``python -m attnpatch hub lock`` resolves online (attnpatch/cli/hub.py)."""
    target = Path(path) if path is not None else lock_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(json.dumps({"schema": LOCK_SCHEMA, "kernels": kernels}, indent=2) + "\n")
    os.replace(partial, target)  # a reader never sees half a file
    forget_downloads()
    return target


# ----- download ---------------------------------------------------------------------------------------------------


def load(name: str) -> Any:
    """The kernel module of the Hub backend ``name``, downloaded on first use; raises BackendUnavailable.

    Call it before torch.compile to have the kernel ready inside compiled code.
    """
    module = _loaded.get(name)
    if module is not None:
        return module
    repo_id, rev, arguments = _source(name)
    key = (repo_id, rev)
    module = _modules.get(key)
    if module is None:
        if not trusted():
            raise BackendUnavailable(_trust_reason(name))
        if key in _failures:
            raise BackendUnavailable(_failures[key])
        module = _modules[key] = _download(repo_id, rev, arguments)
    function = KERNELS[name].function
    if not hasattr(module, function):
        raise BackendUnavailable(
            f"{repo_id}@{rev} has no {function}: pin a revision that has it, "
            f"attnpatch.backends.hub.pin_hub_kernel({name!r}, '<revision>')"
        )
    _loaded[name] = module
    return module


def _download(repo_id: str, rev: str, arguments: dict[str, Any]) -> Any:
    get_kernel = _probe.lib("kernels").get_kernel
    offline = offline_requested()
    try:
        with _offline_mode(offline):
            return get_kernel(repo_id, **arguments, **_trust_argument(get_kernel, repo_id))
    except Exception as exc:  # whatever the Hub client raises, the backend must fall back with the reason
        message = _failure(exc, repo_id, rev, offline)
        _failures[(repo_id, rev)] = message
        raise BackendUnavailable(message) from exc


def offline_requested() -> bool:
    """Whether huggingface_hub should stay offline: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, read now."""
    # huggingface_hub reads HF_HUB_OFFLINE once, at its import; a user who sets it later (a notebook cell, a test,
    # a launcher that imports transformers first) still means it, so the environment is read again here.
    spelled = (env.raw("HF_HUB_OFFLINE") or env.raw("TRANSFORMERS_OFFLINE") or "").upper()
    constants = sys.modules.get("huggingface_hub.constants")
    return spelled in HF_TRUE or bool(getattr(constants, "HF_HUB_OFFLINE", False))


@contextlib.contextmanager
def _offline_mode(offline: bool) -> Iterator[None]:
    # kernels (load.py) and huggingface_hub read huggingface_hub.constants.HF_HUB_OFFLINE at each call: switched
    # on for this download, kernels loads from the cache or fails at once instead of retrying the network ~25 s.
    # kernels imported huggingface_hub.constants with itself; if it did not, it does not read it either.
    constants: Any = sys.modules.get("huggingface_hub.constants") if offline else None
    if constants is None:
        yield
        return
    with _offline_switch:
        before = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = before


def _failure(exc: BaseException, repo_id: str, rev: str, offline: bool) -> str:
    what, where = _one_line(exc), f"{repo_id}@{rev}"
    if offline and _unreachable(exc):
        return (
            f"the kernels package could not reach the Hub: HF_HUB_OFFLINE is set and {where} is not in the local "
            f"cache ({what}); download it while online first (a call, or attnpatch.backends.hub.load, without "
            "HF_HUB_OFFLINE), or unset HF_HUB_OFFLINE"
        )
    if _unreachable(exc):
        return (
            f"the kernels package could not reach the Hub: {what} (fetching {where}); once downloaded it loads from "
            "the Hugging Face cache: set HF_HUB_OFFLINE=1 to load it from there without the network"
        )
    if "trusted publisher" in what or "publisher trust" in what:
        return (
            f"the kernels package refused {where}: {what}; to run this publisher's code anyway: "
            f"attnpatch.backends.hub.trust_remote_code([{repo_id!r}]) or {REMOTE_CODE_VARIABLE}={repo_id}"
        )
    return f"the kernels package could not load {where}: {what}"


def _unreachable(exc: BaseException) -> bool:
    # No network, or offline with nothing cached. Matched by class name along the cause chain, since kernels wraps
    # some (its publisher check raises ValueError from httpx's ConnectError) and the transports differ (httpx,
    # httpx2, requests); kernels' own offline refusals are a ValueError or FileNotFoundError saying "offline mode".
    # Not every OSError: huggingface_hub's RepositoryNotFoundError is one, and that Hub was reached.
    network = {"ConnectError", "ConnectTimeout", "NetworkError", "TimeoutException", "ConnectionError", "TimeoutError"}
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {cls.__name__ for cls in type(current).__mro__}
        if names & (network | {"OfflineModeIsEnabled", "LocalEntryNotFoundError"}) or "offline mode" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _parameters(function: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


def forget_downloads() -> None:
    """Forget loaded kernels, remembered failures and the lock file read (the next call loads and reads again)."""
    global _lock_entries
    _modules.clear()
    _lock_entries = None
    _invalidate()


def reset() -> None:
    """Back to the start: trust follows the environment, default revisions, nothing loaded, failed or warned."""
    global _trusted, _remote_code
    _trusted = None
    _remote_code = None
    _pins.clear()
    _warned.clear()
    forget_downloads()


def _invalidate() -> None:
    _failures.clear()
    _loaded.clear()
    registry.refresh()


# ----- declaration ------------------------------------------------------------------------------------------------


def _requires(name: str) -> Callable[[], list[str]]:
    spec = KERNELS[name]

    @_probe.constant_for_compile  # see _probe.requires
    def reasons() -> list[str]:
        found = _probe.package_reasons("kernels", "kernels", spec.min_kernels)
        trust = [] if trusted() else [_trust_reason(name)]
        return found + trust + _probe.device_reasons(spec.device)

    return reasons


def _check(name: str, caps: Capabilities, *more: Callable[[CallSpec], list[str]]) -> Callable[[CallSpec], list[str]]:
    def check(call: CallSpec) -> list[str]:
        reasons = [reason for extra in more for reason in extra(call)]
        # Never download for a call the backend cannot serve: its capabilities (which the registry reports itself)
        # and the family's rules come first, the download last, so a float32 call costs no download.
        if reasons or capability_reasons(caps, call):
            return reasons
        repo_id, rev, _ = _source(name)
        if call.compiling:
            if (repo_id, rev) not in _modules:
                reasons.append(
                    f"{repo_id}@{rev} is not downloaded yet and torch.compile cannot download inside a traced "
                    f"region: call attnpatch.backends.hub.load({name!r}) before compiling"
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
        check=_check(name, caps, *checks),
        description=description,
        kernel=True,
    )
