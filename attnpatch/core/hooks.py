"""Public seams of the router, for tools (report, verify, autotune, bench) and users' own instruments.

- Observers see every routed call as a :class:`CallRecord`; one may return a tensor to replace the call's output
  (verify's fallback action hands back the float64 reference, cast). While none is registered the dispatcher
  takes its fast path and calls nothing here.
- The auto chooser picks among the backends ``auto`` found able to serve a call (the autotuner plugs in here).
- Per-site overrides route every call of one site (a patched module's qualified name) to another selection,
  keeping what was requested for the report (verify's fallback moves a failing module to native this way).
- The call timer times the backend call itself (report's timing) and fills :attr:`CallRecord.seconds`.
- The selection origin says what chose a site's selection now (a plan's rule), for the report's rows.

Everything here is read by the dispatcher only on its slow path, which it takes while an observer is registered
or a site has an override.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from attnpatch.core import forksafe
from attnpatch.core.call import CallSpec
from attnpatch.core.listeners import Listeners
from attnpatch.core.registry import Backend


@dataclass
class CallRecord:
    """One routed call, as observers see it. Tensors are in the dispatcher layout (B, S, H, D)."""

    site: str | None
    requested: str
    served: str
    refused: dict[str, list[str]]
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    dropout_p: float
    is_causal: bool
    scale: float | None
    output: torch.Tensor
    seconds: float | None = None  # the backend call's duration, when a call timer is set
    # The later arguments the call had (softcap, window, sinks; see attnpatch.core.call), empty for most calls.
    extra: dict[str, Any] = field(default_factory=dict)


Observer = Callable[[CallRecord], "torch.Tensor | None"]
AutoChooser = Callable[[CallSpec, list[Backend], tuple[Any, ...]], Backend]
# timer(fn, args) -> (fn(*args), seconds)
CallTimer = Callable[[Callable[..., torch.Tensor], tuple[Any, ...]], tuple[torch.Tensor, float]]
# origin(site) -> what chose the site's selection for the call running now ("rule 2: transformer [1:-1]"), or None
SelectionOrigin = Callable[[str], "str | None"]

# The site of calls made outside any patched module (dispatch_attention called directly, or a layer with no name).
DIRECT = "<direct>"

_lock = forksafe.Lock()
_changed = Listeners()

# Read by the dispatcher (a list that is empty while nobody observes); change it with add/remove_observer.
observers: list[Observer] = []
_overrides: dict[str, str] = {}
# The hooks that hold one function each (None: none), set and read through the verbs below.
_installed: dict[str, Any] = {"auto_chooser": None, "call_timer": None, "origin": None}


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener`` when the observers change (the dispatcher decides its fast path from them)."""
    _changed.add(listener)


def _install(name: str, hook: Any, notify: bool = False) -> Any:
    # Install one of the single-function hooks; returns the previous one. ``notify``: the dispatcher's decisions
    # depend on it.
    previous, _installed[name] = _installed[name], hook
    if notify:
        _changed()
    return previous


def add_observer(observer: Observer) -> None:
    with _lock:
        if observer not in observers:
            observers.append(observer)
    _changed()


def remove_observer(observer: Observer) -> None:
    with _lock:
        if observer in observers:
            observers.remove(observer)
    _changed()


def clear_observers() -> None:
    with _lock:
        observers.clear()
    _changed()


def set_auto_chooser(chooser: AutoChooser | None) -> AutoChooser | None:
    """Install ``chooser`` for ``auto`` (None: the highest priority wins); returns the previous one."""
    return _install("auto_chooser", chooser, notify=True)


def auto_chooser() -> AutoChooser | None:
    return _installed["auto_chooser"]


def set_call_timer(timer: CallTimer | None) -> CallTimer | None:
    """Time each backend call with ``timer`` while observers run (None: no timing); returns the previous one."""
    return _install("call_timer", timer)


def call_timer() -> CallTimer | None:
    return _installed["call_timer"]


def set_site_override(site: str, selection: str | None) -> None:
    """Route the calls of ``site`` to ``selection`` (None removes the override)."""
    with _lock:
        if selection is None:
            _overrides.pop(site, None)
        else:
            _overrides[site] = selection
    _changed()  # the dispatcher forgets decisions made for the site before


def site_override(site: str | None) -> str | None:
    """The override for ``site`` (None: :data:`DIRECT`), if any; cheap when there are none."""
    if not _overrides:
        return None
    return _overrides.get(site or DIRECT)


def has_site_overrides() -> bool:
    """Whether any site has an override (the dispatcher's fast path then checks each call's site)."""
    return bool(_overrides)


def clear_site_overrides() -> None:
    with _lock:
        _overrides.clear()
    _changed()


def set_selection_origin(origin: SelectionOrigin | None) -> SelectionOrigin | None:
    """Install ``origin`` (None: none), which says what chose a site's selection; returns the previous one."""
    return _install("origin", origin)


def selection_origin(site: str | None) -> str | None:
    """What chose the selection of ``site``'s call running now (a plan's rule), None when nothing says."""
    origin = _installed["origin"]
    return None if origin is None or site is None else origin(site)


def snapshot() -> dict[str, Any]:
    return {"observers": list(observers), "overrides": dict(_overrides), **_installed}


def restore(saved: dict[str, Any]) -> None:
    with _lock:
        observers[:] = saved["observers"]
        _overrides.clear()
        _overrides.update(saved["overrides"])
    _installed.update(auto_chooser=saved["auto_chooser"], call_timer=saved["call_timer"], origin=saved.get("origin"))
    _changed()
