"""The routing report: what ran where, what fell back and why, what passed through untouched.

Turn it on with ``python -m attnpatch script.py --report[=PATH]``, ``ATTNPATCH_REPORT=1|PATH`` or
``attnpatch.report.enable(PATH)``. At exit a table goes to stderr; a PATH ending in ``.json`` also gets the JSON
below, any other PATH gets the table. When the report is off no observer is registered and the dispatcher keeps
its fast path: the report costs nothing. While it is on every routed call passes one observer (about a
microsecond); calls traced by ``torch.compile`` are not observed (the dispatcher skips observers while compiling).

A *site* is the attention layer's module path, e.g. ``transformer.transformer_blocks.0.attn`` (set by the
patchers); calls of :func:`attnpatch.dispatch_attention` outside a patched model are the site ``<direct>``.
The table groups sites whose paths differ only in layer numbers (``transformer_blocks.*.attn``); the JSON keeps
every site.

JSON schema ``attnpatch.report/1`` (every key always present; ``null`` where not measured)::

    {
      "schema": "attnpatch.report/1",
      "attnpatch": "0.1.0", "torch": "2.13.0",
      "started": "2026-01-01T12:00:00+00:00",   # ISO 8601, when the report was enabled
      "wall_seconds": 12.3,                      # from enable() to the snapshot
      "timed": false,                            # true when per-call time was measured (enable(timing=True))
      "totals": {"calls": 1234,                  # routed calls observed
                 "fallback_calls": 0,            # calls that a backend of the chain refused
                 "passthrough_calls": 4,         # calls handed to the library's own code untouched
                 "attention_seconds": null},     # sum of timed calls
      "sites": [{
        "site": "transformer.transformer_blocks.0.attn",
        "calls": 28,
        "fallback_calls": 28,                    # calls some backend of the chain refused (see "fallbacks")
        "requested": {"sage,native": 28},        # selection (chain spec) -> calls
        "served": {"native": 28},                # backend that ran -> calls
        "fallbacks": [{"backend": "sage", "reason": "needs a CUDA GPU ...", "served_by": "native", "calls": 28}],
        "shapes": [{"query": [2, 4096, 24, 128], "key": [2, 4096, 24, 128], "mask": "none", "causal": false,
                    "calls": 28}],               # query/key in (batch, seq, heads, head_dim); mask kind after
                                                 # normalisation: none, key_padding, bool, additive
        "dtypes": {"bfloat16": 28},
        "passthrough": [{"reason": "return_lse requested", "calls": 2}],
        "seconds": null, "time_share": null,     # time in attention; share of all timed attention time
        "verify": null                           # with verify on: {"checked", "failed", "max_abs", "max_rel",
                                                 #   "worst", "atol", "rtol", "action"} (see attnpatch.verify)
      }, ...]                                    # in the order the sites were first seen
    }

See docs/report.md for a worked example.
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

SCHEMA = "attnpatch.report/1"
DIRECT = hooks.DIRECT

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
        _atexit_registered = True


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
        "totals": {
            "calls": sum(s["calls"] for s in sites),
            "fallback_calls": sum(s["fallback_calls"] for s in sites),
            "passthrough_calls": sum(sum(c.values()) for c in passthrough.values()),
            "attention_seconds": total_seconds,
        },
        "sites": sites,
    }


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


_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")


def group_name(site: str) -> str:
    """``transformer.transformer_blocks.7.attn`` -> ``transformer.transformer_blocks.*.attn``."""
    return _NUMBER.sub("*", site)


def format_table(data: dict[str, Any]) -> str:
    """The text report: one row per group of sites, then every fallback and passthrough reason."""
    groups: dict[str, dict[str, Any]] = {}
    for site in data["sites"]:
        name = group_name(site["site"])
        group = groups.setdefault(
            name,
            {
                "modules": 0,
                "calls": 0,
                "requested": Counter(),
                "served": Counter(),
                "fallback": 0,
                "passthrough": 0,
                "shapes": set(),
                "dtypes": Counter(),
                "seconds": None,
                "verify": None,
            },
        )
        group["modules"] += 1
        group["calls"] += site["calls"]
        group["requested"].update(site["requested"])
        group["served"].update(site["served"])
        group["fallback"] += site["fallback_calls"]
        group["passthrough"] += sum(p["calls"] for p in site["passthrough"])
        group["shapes"].update((tuple(s["query"]), tuple(s["key"])) for s in site["shapes"])
        group["dtypes"].update(site["dtypes"])
        if site["seconds"] is not None:
            group["seconds"] = (group["seconds"] or 0.0) + site["seconds"]
        if site["verify"] is not None:
            group["verify"] = _merge_verify(group["verify"], site["verify"])
    total = data["totals"]["attention_seconds"]
    headers = ["module", "n", "asked", "served", "calls", "fallback", "passthru", "shapes", "dtypes"]
    if data["timed"]:
        headers.append("time")
    if any(g["verify"] for g in groups.values()):
        headers.append("verify")
    rows = []
    for name, g in groups.items():
        row = [
            name,
            str(g["modules"]),
            _counts(g["requested"]),
            _counts(g["served"]),
            str(g["calls"]),
            str(g["fallback"]),
            str(g["passthrough"]),
            str(len(g["shapes"])),
            _counts(g["dtypes"]),
        ]
        if data["timed"]:
            timed = total and g["calls"] and g["seconds"] is not None
            row.append(f"{100 * g['seconds'] / total:.1f}%" if timed else "-")
        if "verify" in headers:
            row.append(_verify_cell(g["verify"]))
        rows.append(row)
    totals = data["totals"]
    lines = [
        f"attnpatch report: {totals['calls']} attention calls routed, {totals['fallback_calls']} fell back, "
        f"{totals['passthrough_calls']} passed through ({data['wall_seconds']:.1f} s)"
    ]
    if not rows:
        lines.append("  no attention call reached attnpatch (is the model patched? see `python -m attnpatch --help`)")
    else:
        lines.extend(align([headers, *rows]))
    reasons = Counter[tuple[str, str, str]]()
    for site in data["sites"]:
        for f in site["fallbacks"]:
            reasons[(f["backend"], f["reason"], f["served_by"])] += f["calls"]
    if reasons:
        lines.append("fallbacks:")
        lines.extend(f"  {b} -> {s}: {r} ({n} calls)" for (b, r, s), n in reasons.items())
    passthrough = Counter[str]()
    for site in data["sites"]:
        for p in site["passthrough"]:
            passthrough[p["reason"]] += p["calls"]
    if passthrough:
        lines.append("passed through to the library's own attention:")
        lines.extend(f"  {r} ({n} calls)" for r, n in passthrough.items())
    return "\n".join(lines)


def _merge_verify(into: dict[str, Any] | None, row: dict[str, Any]) -> dict[str, Any]:
    if into is None:
        return dict(row)
    merged = dict(into)
    merged["checked"] += row["checked"]
    merged["failed"] += row["failed"]
    for key in ("max_abs", "max_rel", "worst"):
        merged[key] = max(merged[key], row[key])
    merged["action"] = merged.get("action") or row.get("action")
    return merged


def _verify_cell(row: dict[str, Any] | None) -> str:
    if row is None or not row["checked"]:
        return "-"
    status = "FAIL" if row["failed"] else "ok"
    moved = " -> native" if row.get("action") == "moved to native" else ""
    return f"{status} {row['max_abs']:.1e} ({row['worst']:.2g}x tol){moved}"


def _counts(counter: Counter[str]) -> str:
    if not counter:
        return "-"
    if len(counter) == 1:
        return next(iter(counter))
    return " ".join(f"{k}:{n}" for k, n in counter.most_common())


def align(table: list[list[str]], indent: str = "  ") -> list[str]:
    """Rows of cells -> lines with the columns aligned (the text tables of report, verify, bench and demo)."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [indent + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in table]


_INT_LIST = re.compile(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]")


def to_json(data: dict[str, Any]) -> str:
    """Indented JSON with shape lists on one line ([2, 4096, 24, 128])."""
    return _INT_LIST.sub(
        lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", json.dumps(data, indent=2)
    )


def write(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Print the table (and write the file given at enable() or here); returns the snapshot."""
    data = snapshot()
    text = format_table(data)
    state = _state
    assert state is not None
    target = Path(path) if path is not None else state.path
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
