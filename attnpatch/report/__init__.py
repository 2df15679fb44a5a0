"""The routing report: what ran where, what fell back and why, what passed through untouched.

Turn it on with ``python -m attnpatch script.py --report[=PATH]``, ``ATTNPATCH_REPORT=1|PATH`` or
``attnpatch.report.enable(PATH)``. At exit a table goes to stderr; a PATH ending in ``.json`` also gets the JSON
(schema ``attnpatch.report/1``, documented key by key in docs/report.md, with a worked example), any other PATH
gets the table. When the report is off no observer is registered and the dispatcher keeps its fast path: the
report costs nothing. While it is on every routed call passes one observer (about a microsecond); calls traced
by ``torch.compile`` are not observed (the dispatcher skips observers while compiling).

A *site* is the attention layer's module path, e.g. ``transformer.transformer_blocks.0.attn`` (set by apply, or
by the patchers at a layer's first call); calls of :func:`attnpatch.dispatch_attention` outside a patched model
are the site ``<direct>``. The table groups sites whose paths differ only in layer numbers
(``transformer_blocks.*.attn``); the JSON keeps every site. Layers a patcher leaves alone (a diffusers processor
that computes the probabilities itself) are listed apart, with the fix.

With an attention plan applied (attnpatch.api.plans), each row also says which rule chose the backend of its calls
(``rules``: rule -> calls; a layer whose rule changes with the denoising step has several).

Processes: the interpreters a run starts (multiprocessing spawn, subprocess, torchrun ranks) inherit
ATTNPATCH_REPORT. The process that activated the report first is the run's parent (it sets
``ATTNPATCH_REPORT_PARENT`` to its pid for its children); every other process writes its own file beside the
parent's, ``run.<pid>.json`` beside ``run.json``, never the parent's. The parent's table and JSON (``children``)
say which processes reported and their totals.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from attnpatch.core import dispatch, hooks, masks
from attnpatch.core.call import dtype_name
from attnpatch.errors import AttnpatchError
from attnpatch.report._table import SKIPPED, align, format_table, group_name, to_json

__all__ = [
    "DIRECT",
    "PARENT_VARIABLE",
    "SCHEMA",
    "SKIPPED",
    "align",
    "check_path",
    "disable",
    "enable",
    "enabled",
    "format_table",
    "group_name",
    "set_verify_source",
    "snapshot",
    "to_json",
    "write",
]

SCHEMA = "attnpatch.report/1"
DIRECT = hooks.DIRECT
# The run's parent process (its pid), set by attnpatch.startup when it activates a report; inherited by children.
PARENT_VARIABLE = "ATTNPATCH_REPORT_PARENT"

# A path value that only means "on" (ATTNPATCH_REPORT=1): print the table, write no file.
_ON_WORDS = frozenset({"1", "true", "yes", "on"})


@dataclass
class _Site:
    calls: int = 0
    fallback_calls: int = 0
    requested: Counter[str] = field(default_factory=Counter)
    served: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (backend, reason, served_by)
    shapes: Counter[tuple[tuple[int, ...], tuple[int, ...], str, bool]] = field(default_factory=Counter)
    dtypes: Counter[str] = field(default_factory=Counter)
    rules: Counter[str] = field(default_factory=Counter)  # the plan rule that chose the backend -> calls
    seconds: float = 0.0


class _State:
    def __init__(self, path: Path | None, timing: bool, stream: TextIO | None) -> None:
        self.path = path
        self.timing = timing
        self.stream = stream
        self.sites: dict[str, _Site] = {}
        self.lock = threading.Lock()
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.started_clock = time.perf_counter()
        self.passthrough_base = dispatch.passthrough_counts()
        parent = os.environ.get(PARENT_VARIABLE, "")
        # A child of the run's parent (or a fork of any reporting process): writes its own file.
        self.parent = int(parent) if parent.isdigit() and int(parent) != os.getpid() else None

    def target(self) -> Path | None:
        """The file this process writes: the path given, or run.<pid>.json beside it in a child process."""
        if self.path is None or self.parent is None:
            return self.path
        return self.path.with_name(f"{self.path.stem}.{os.getpid()}{self.path.suffix}")


_state: _State | None = None
_atexit_registered = False


def enable(path: str | os.PathLike[str] | None = None, *, timing: bool = False, stream: TextIO | None = None) -> None:
    """Collect a report of every routed call from now on and print it at exit.

    path: None (or "1") prints the table only; ``*.json`` also writes the JSON schema above; any other path
        gets the text table. Checked here, so a path that cannot be written fails now, not after the run.
    timing: also measure the time of each attention call (synchronises the GPU around each call, which slows
        the run a little) and show each site's share of attention time.
    stream: where the table is printed at exit (default: stderr).
    Calling enable again restarts the report with the new settings.
    """
    global _state, _atexit_registered
    target = check_path(path)
    disable()
    _state = _State(target, timing, stream)
    if timing:
        hooks.set_call_timer(_timed_call)
    hooks.add_observer(_observe)
    if not _atexit_registered:
        atexit.register(_at_exit)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _atexit_registered = True


_forking_pid: int | None = None


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _after_fork_in_child() -> None:
    # A forked child starts its own report (the parent's calls are the parent's to report) and is a child.
    global _state
    if _state is not None:
        _state = _State(_state.path, _state.timing, _state.stream)
        _state.parent = _forking_pid


def disable() -> None:
    """Stop collecting (the dispatcher is back on its fast path); what was collected is dropped."""
    global _state
    hooks.remove_observer(_observe)
    if hooks.call_timer() is _timed_call:
        hooks.set_call_timer(None)
    _state = None


def enabled() -> bool:
    return _state is not None


_REPORT_OPTION = "--report=PATH / ATTNPATCH_REPORT=PATH"


def check_path(
    path: str | os.PathLike[str] | None, what: str = "the report", option: str = _REPORT_OPTION
) -> Path | None:
    """The file the report will be written to (None: table only); raises AttnpatchError if it cannot be written.

    enable() calls it; a runner can call it before the script starts, so a bad path fails at once instead of
    losing the report at exit. Relative paths are taken from the current folder now (a script's chdir later does
    not move the report).
    """
    if path is None or str(path).strip().lower() in _ON_WORDS or str(path).strip() == "":
        return None
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise AttnpatchError(
            f"cannot write {what} to {str(target)!r}: it is a folder. Pass a file name such as "
            f"{target / 'out.json'} ({option})"
        )
    parent = target.parent
    if not parent.is_dir():
        raise AttnpatchError(
            f"cannot write {what} to {str(target)!r}: folder {str(parent)!r} does not exist. "
            f"Create it, or pass another path ({option})"
        )
    existed = target.exists()
    try:
        with open(target, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise AttnpatchError(
            f"cannot write {what} to {str(target)!r}: {exc.strerror or exc}. Pass a writable path ({option})"
        ) from None
    if not existed:
        target.unlink()  # only probed; the file is written at exit
    return target


def _observe(record: hooks.CallRecord) -> None:
    state = _state
    if state is None:
        return
    seconds = record.seconds if state.timing else None
    site_name = record.site or DIRECT
    shape_key = (tuple(record.query.shape), tuple(record.key.shape), masks.kind_of(record.attn_mask), record.is_causal)
    with state.lock:
        site = state.sites.get(site_name)
        if site is None:
            site = state.sites[site_name] = _Site()
        site.calls += 1
        site.requested[record.requested] += 1
        site.served[record.served] += 1
        if record.refused:
            site.fallback_calls += 1
        for backend, reasons in record.refused.items():
            for reason in reasons:
                site.fallbacks[(backend, reason, record.served)] += 1
        site.shapes[shape_key] += 1
        site.dtypes[dtype_name(record.query.dtype)] += 1
        rule = hooks.selection_origin(site_name)
        if rule is not None:
            site.rules[rule] += 1
        if seconds is not None:
            site.seconds += seconds


def _timed_call(fn: Callable[..., torch.Tensor], args: tuple[Any, ...]) -> tuple[torch.Tensor, float]:
    # The dispatcher's call timer (attnpatch.core.hooks): the backend call alone, GPU work included.
    query = args[0]
    cuda = query.is_cuda
    if cuda:
        torch.cuda.synchronize(query.device)
    start = time.perf_counter()
    out = fn(*args)
    if cuda:
        torch.cuda.synchronize(query.device)
    return out, time.perf_counter() - start


def snapshot() -> dict[str, Any]:
    """The report so far, as the JSON schema in the module docstring (raises if the report is off)."""
    state = _state
    if state is None:
        raise AttnpatchError("the report is off: call attnpatch.report.enable() first (or run with --report)")
    passthrough: dict[str, Counter[str]] = {}
    base = state.passthrough_base
    for (where, reason), count in dispatch.passthrough_counts().items():
        count -= base.get((where, reason), 0)
        if count > 0:
            passthrough.setdefault(where or DIRECT, Counter())[reason] += count
    verify_rows = _verify_rows()
    with state.lock:
        names = list(state.sites) + [s for s in passthrough if s not in state.sites]
        total_seconds = sum(s.seconds for s in state.sites.values()) if state.timing else None
        sites = []
        for name in names:
            site = state.sites.get(name) or _Site()
            seconds = site.seconds if state.timing else None
            sites.append(
                {
                    "site": name,
                    "calls": site.calls,
                    "fallback_calls": site.fallback_calls,
                    "requested": dict(site.requested),
                    "served": dict(site.served),
                    "fallbacks": [
                        {"backend": b, "reason": r, "served_by": s, "calls": n}
                        for (b, r, s), n in site.fallbacks.items()
                    ],
                    "shapes": [
                        {"query": list(q), "key": list(k), "mask": m, "causal": c, "calls": n}
                        for (q, k, m, c), n in site.shapes.items()
                    ],
                    "dtypes": dict(site.dtypes),
                    "rules": dict(site.rules),
                    "passthrough": [{"reason": r, "calls": n} for r, n in passthrough.get(name, Counter()).items()],
                    "seconds": seconds,
                    "time_share": (seconds / total_seconds) if seconds is not None and total_seconds else None,
                    "verify": verify_rows.get(name),
                }
            )
    return {
        "schema": SCHEMA,
        "attnpatch": _version(),
        "torch": torch.__version__,
        "started": state.started.isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - state.started_clock, 6),
        "timed": state.timing,
        "pid": os.getpid(),
        "parent_pid": state.parent,
        "totals": {
            "calls": sum(s["calls"] for s in sites),
            "fallback_calls": sum(s["fallback_calls"] for s in sites),
            "passthrough_calls": sum(sum(c.values()) for c in passthrough.values()),
            "attention_seconds": total_seconds,
        },
        "children": _children(state),
        "sites": sites,
    }


_TOTALS = ("calls", "fallback_calls", "passthrough_calls")
_HEADER = re.compile(
    r"attnpatch report \(pid (\d+), child of pid (\d+)\): (\d+) attention calls routed, (\d+) fell back, "
    r"(\d+) passed through"
)


def _children(state: _State) -> list[dict[str, Any]]:
    """The reports that child processes of this one wrote beside its file during this run (for the parent)."""
    if state.path is None or state.parent is not None or not state.path.parent.is_dir():
        return []
    name = re.compile(rf"{re.escape(state.path.stem)}\.(\d+){re.escape(state.path.suffix)}")
    found = []
    for file in sorted(state.path.parent.iterdir(), key=lambda f: f.name):
        try:
            if not name.fullmatch(file.name):
                continue
            text = file.read_text(encoding="utf-8")
            if file.suffix.lower() == ".json":
                data = json.loads(text)
                pid, parent, totals = data["pid"], data["parent_pid"], [data["totals"][k] for k in _TOTALS]
            else:
                match = _HEADER.search(text)
                if match is None:
                    continue
                pid, parent, *totals = (int(g) for g in match.groups())
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a report of ours, or one being written: not counted
        if parent == os.getpid():
            found.append({"pid": pid, "file": file.name, **dict(zip(_TOTALS, totals, strict=True))})
    return found


_verify_source: Callable[[], list[dict[str, Any]]] | None = None


def set_verify_source(source: Callable[[], list[dict[str, Any]]] | None) -> None:
    """Where the verify columns come from (attnpatch.verify sets its ``site_summary`` while it is enabled)."""
    global _verify_source
    _verify_source = source


def _verify_rows() -> dict[str, dict[str, Any]]:
    if _verify_source is None:
        return {}
    return {row["site"]: {k: v for k, v in row.items() if k != "site"} for row in _verify_source()}


def _version() -> str:
    from attnpatch import __version__

    return __version__


def write(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Print the table (and write the file given at enable() or here); returns the snapshot."""
    data = snapshot()
    text = format_table(data)
    state = _state
    assert state is not None
    target = Path(path) if path is not None else state.target()
    if target is not None:
        if target.suffix.lower() == ".json":
            target.write_text(to_json(data) + "\n", encoding="utf-8")
        else:
            target.write_text(text + "\n", encoding="utf-8")
    stream = state.stream or sys.stderr
    print(text, file=stream)
    if target is not None:
        print(f"attnpatch report written to {target}", file=stream)
    stream.flush()
    return data


def _at_exit() -> None:
    if _state is None:
        return
    try:
        write()
    except Exception as exc:  # never turn a finished run into a crash at interpreter exit
        print(f"attnpatch: could not write the report: {type(exc).__name__}: {exc}", file=sys.stderr)
