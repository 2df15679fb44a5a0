"""Verify: recompute sampled attention calls in float64 and compare them with what the backend returned.

Turn it on with ``python -m attnpatch script.py --verify[=N] [--verify-action=warn|fallback|raise]``,
``ATTNPATCH_VERIFY=1|N`` (+ ``ATTNPATCH_VERIFY_ACTION``) or ``attnpatch.verify.enable(every, action)``.

Sampling: ``every=1`` (the default) checks the first call of each (module, shape); ``every=N`` (N >= 2) checks the
1st, (N+1)th, (2N+1)th ... call of each (module, shape). A shape is query and key shape, dtype, mask kind and
causality, and the backend that served the call (a fallback backend is checked too). Sequence lengths count by
power of two (a query or key of 33 to 64 tokens is one shape), so a decoder whose KV cache grows by a token per
step is checked a few times, not at every step. Calls with dropout are not checked (their result is random by
design).

The reference is ``_native_math`` (SDPA's math kernel) on float64 copies of query, key, value and mask, computed
in chunks of query rows so a 4096-token call does not need gigabytes. A call passes when every element satisfies
``|out - ref| <= atol + rtol * |ref|`` with the serving backend's tolerance for the input dtype
(``Backend.caps.tolerance_for``). Recorded per module: calls checked and failed, max abs error, max rel error
(max abs error / max |ref|) and ``worst``, the largest ``|out - ref| / (atol + rtol * |ref|)`` (> 1 fails). An output
of the wrong shape or type fails with ``worst`` = inf and a ``note`` saying what came back; verify never raises
from a user's call for it (only the ``raise`` action does, on purpose).

Actions on a failed check:
  warn      one warning per module (default); the run goes on unchanged.
  fallback  the failing call's output is replaced by the reference (cast to its dtype) and that module runs on
            ``native`` for the rest of the run; a warning says so. This is what rescues fragile parts (an fp32 VAE,
            a text encoder) from a lossy backend: they often run once, so the failing call itself is fixed.
  raise     raise :class:`VerifyError` from the attention call.

Cost: one float64 attention per checked call; with the default sampling that is a handful of calls per module.
"""

from __future__ import annotations

import atexit
import functools
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

from attnpatch import report
from attnpatch.core import forksafe, hooks, masks, registry
from attnpatch.core.call import dtype_name
from attnpatch.errors import AttnpatchError, AttnpatchWarning
from attnpatch.report import DIRECT, align

ACTIONS = ("warn", "fallback", "raise")
# Query rows per reference chunk are chosen so one float64 score block stays under this many bytes.
_CHUNK_BYTES = 256 * 2**20


class VerifyError(AttnpatchError):
    """A verified attention call differs from the float64 reference by more than its backend's tolerance."""


@dataclass
class Check:
    """One verified call."""

    site: str
    backend: str
    query: tuple[int, ...]
    key: tuple[int, ...]
    dtype: str
    mask: str
    causal: bool
    max_abs: float
    max_rel: float
    worst: float  # max |out - ref| / (atol + rtol * |ref|); passes when <= 1
    atol: float
    rtol: float
    note: str = ""  # why the output could not be compared (wrong shape or type); "" for a compared output

    @property
    def ok(self) -> bool:
        return self.worst <= 1.0  # NaN compares False: a NaN output fails


@dataclass
class _Settings:
    every: int
    action: str


_settings: _Settings | None = None
_lock = forksafe.Lock()
_seen: dict[tuple[Any, ...], int] = {}
_checks: list[Check] = []
_actions: dict[str, str] = {}  # site -> what was done ("warned", "moved to native", "raised")
# site -> the backend its calls use instead of their own (verify-action=fallback), set as a site override
_overrides: dict[str, str] = {}
_atexit_registered = False


def parse_every(value: str | int | None) -> int:
    """``--verify`` / ATTNPATCH_VERIFY value -> sampling interval (1 = first call per module and shape)."""
    if (
        value is None
        or value is True
        or (isinstance(value, str) and value.strip().lower() in {"", "true", "yes", "on"})
    ):
        return 1
    try:
        every = int(value)
    except (TypeError, ValueError):
        every = 0
    if every < 1:
        raise AttnpatchError(
            f"verify interval {value!r} is not a positive integer: use 1 (first call of each module and shape) "
            "or N (every Nth call), e.g. --verify=10 or ATTNPATCH_VERIFY=10"
        )
    return every


def parse_action(value: str | None) -> str:
    action = (value or "warn").strip().lower()
    if action not in ACTIONS:
        raise AttnpatchError(
            f"verify action {value!r} is not one of {', '.join(ACTIONS)} "
            "(--verify-action=warn|fallback|raise or ATTNPATCH_VERIFY_ACTION)"
        )
    return action


def enable(every: int | str | None = 1, action: str | None = "warn") -> None:
    """Verify sampled calls from now on (see the module docstring); a summary is printed at exit.

    Calling enable again restarts verification with the new settings.
    """
    global _settings, _atexit_registered
    settings = _Settings(parse_every(every), parse_action(action))
    disable()
    _settings = settings
    hooks.add_observer(_observe)
    report.set_verify_source(site_summary)
    if not _atexit_registered:
        atexit.register(_at_exit)
        _atexit_registered = True


def disable() -> None:
    """Stop verifying; modules moved to native go back to their own backend; results are dropped."""
    global _settings
    hooks.remove_observer(_observe)
    report.set_verify_source(None)
    _settings = None
    with _lock:
        _seen.clear()
        _checks.clear()
        _actions.clear()
        for site in _overrides:
            hooks.set_site_override(site, None)
        _overrides.clear()


def enabled() -> bool:
    return _settings is not None


def results() -> list[Check]:
    """Every check made so far, in order."""
    with _lock:
        return list(_checks)


def overridden() -> dict[str, str]:
    """Modules moved to another backend by verify-action=fallback: site -> backend."""
    return dict(_overrides)


def site_summary() -> list[dict[str, Any]]:
    """Per module: checked, failed, max_abs, max_rel, worst, atol, rtol, backend(s) checked, action taken."""
    rows: dict[str, dict[str, Any]] = {}
    for check in results():
        row = rows.get(check.site)
        if row is None:
            row = rows[check.site] = {
                "site": check.site,
                "backends": [],
                "checked": 0,
                "failed": 0,
                "max_abs": 0.0,
                "max_rel": 0.0,
                "worst": 0.0,
                "atol": check.atol,
                "rtol": check.rtol,
                "action": None,
            }
        if check.backend not in row["backends"]:
            row["backends"].append(check.backend)
        row["checked"] += 1
        row["failed"] += not check.ok
        for key in ("max_abs", "max_rel", "worst"):
            value = getattr(check, key)
            row[key] = value if value != value else max(row[key], value)  # keep a NaN visible
        row["atol"], row["rtol"] = check.atol, check.rtol
        row["action"] = _actions.get(check.site)
    return list(rows.values())


def reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    **extra: Any,
) -> torch.Tensor:
    """Attention in float64 on SDPA's math kernel, in chunks of query rows; returns (B, Sq, H, Dv) float64.
    ``extra``: the dispatcher's later arguments the call had (softcap, window, sinks), applied as ``_native_math``
    applies them.

    query: (batch, seq_q, heads, head_dim); key/value: (batch, seq_kv, heads_kv, head_dim[_v]); attn_mask in any
    form :func:`attnpatch.dispatch_attention` takes. Runs on the inputs' device (CPU for devices without
    float64, such as MPS).
    """
    device = query.device if query.device.type in ("cpu", "cuda") else torch.device("cpu")
    q, k, v = (t.detach().to(device=device, dtype=torch.float64) for t in (query, key, value))
    mask = None
    if attn_mask is not None:
        mask, _ = masks.normalize(attn_mask.detach().to(device), q, k)  # an additive mask becomes float64 too
    if is_causal:
        keep = masks.causal(q.shape[1], k.shape[1], device)
        mask = keep[None, None] if mask is None else masks.fold_causal(mask, masks.kind_of(mask), *keep.shape)[0]
    math = registry.get_backend("_native_math").fn
    if extra:
        window = extra.pop("window", None)
        if window is not None:  # folded before chunking: a window is relative to each query row's own position
            mask = masks.fold_window(mask, window, q.shape[1], k.shape[1], device)
        if "sinks" in extra:
            extra["sinks"] = extra["sinks"].detach().to(device=device, dtype=torch.float64)
        math = functools.partial(registry.get_backend("_native_math").extra_fn, **extra)
    batch, seq_q, heads, _ = q.shape
    rows = max(1, _CHUNK_BYTES // max(1, batch * heads * k.shape[1] * 8 * 3))
    if rows >= seq_q:
        return math(q, k, v, mask, 0.0, False, scale, False)
    out = []
    for start in range(0, seq_q, rows):
        stop = min(seq_q, start + rows)
        chunk_mask = mask[:, :, start:stop] if mask is not None and mask.shape[2] != 1 else mask
        out.append(math(q[:, start:stop], k, v, chunk_mask, 0.0, False, scale, False))
    return torch.cat(out, dim=1)


def compare(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> tuple[float, float, float]:
    """(max_abs, max_rel, worst) of ``out`` against the float64 ``ref`` (see the module docstring)."""
    diff = (out.detach().to(ref.device, torch.float64) - ref).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    worst = float((diff / (atol + rtol * ref.abs())).max()) if diff.numel() else 0.0
    if torch.isnan(diff).any():
        max_abs = max_rel = worst = float("nan")
    return max_abs, max_rel, worst


def output_problem(out: Any, ref: torch.Tensor) -> str:
    """Why ``out`` cannot be compared with ``ref`` (B, Sq, H, Dv): a wrong type or shape; "" when it can."""
    if not isinstance(out, torch.Tensor):
        return f"the backend returned {type(out).__name__}, not a tensor"
    if tuple(out.shape) != tuple(ref.shape):
        return (
            f"the backend returned shape {tuple(out.shape)}, expected {tuple(ref.shape)} "
            "(batch, seq_q, heads, head_dim_v)"
        )
    return ""


def bucket(length: int) -> int:
    """``length`` rounded up to a power of two: the sequence lengths one sample stands for."""
    return 1 << max(0, length - 1).bit_length()


def _sample_key(site: str, record: hooks.CallRecord, mask_kind: str) -> tuple[Any, ...]:
    # (batch, seq, heads, head_dim) with the sequence lengths bucketed: a growing KV cache is not a new shape per step.
    q, k = record.query.shape, record.key.shape
    return (
        site,
        record.served,
        (q[0], bucket(q[1]), *q[2:]),
        (k[0], bucket(k[1]), *k[2:]),
        record.query.dtype,
        mask_kind,
        record.is_causal,
    )


def _observe(record: hooks.CallRecord) -> torch.Tensor | None:
    settings = _settings
    if settings is None or record.dropout_p > 0.0:
        return None
    site = record.site or DIRECT
    mask_kind = masks.kind_of(record.attn_mask)
    sample_key = _sample_key(site, record, mask_kind)
    with _lock:
        seen = _seen.get(sample_key, 0)
        _seen[sample_key] = seen + 1
    if (seen > 0 and settings.every == 1) or seen % settings.every:
        return None
    backend = registry.get_backend(record.served)
    atol, rtol = backend.caps.tolerance_for(record.query.dtype, record.scale, record.query.shape[-1])
    with torch.no_grad():
        ref = reference(
            record.query, record.key, record.value, record.attn_mask, record.is_causal, record.scale, **record.extra
        )
        note = output_problem(record.output, ref)
        if note:
            max_abs = max_rel = worst = float("inf")
        else:
            max_abs, max_rel, worst = compare(record.output, ref, atol, rtol)
    check = Check(
        site=site,
        backend=record.served,
        query=tuple(record.query.shape),
        key=tuple(record.key.shape),
        dtype=dtype_name(record.query.dtype),
        mask=mask_kind,
        causal=record.is_causal,
        max_abs=max_abs,
        max_rel=max_rel,
        worst=worst,
        atol=atol,
        rtol=rtol,
        note=note,
    )
    with _lock:
        _checks.append(check)
    return None if check.ok else _act(settings.action, check, record, ref)


def _act(action: str, check: Check, record: hooks.CallRecord, ref: torch.Tensor) -> torch.Tensor | None:
    if check.note:
        what = (
            f"attnpatch verify: {check.site} on {check.backend!r} gave an output that cannot be the attention of "
            f"query {'x'.join(map(str, check.query))}: {check.note}"
        )
    else:
        what = (
            f"attnpatch verify: {check.site} on {check.backend!r} differs from the float64 reference by "
            f"{check.max_abs:.3g} (max abs, {check.max_rel:.2%} of max |ref|; {check.worst:.3g}x the {check.dtype} "
            f"tolerance atol={check.atol:g} rtol={check.rtol:g}) at query {'x'.join(map(str, check.query))}"
        )
    if action == "raise":
        _actions[check.site] = "raised"
        raise VerifyError(what + ". Choose another backend for this module, or --verify-action=warn|fallback")
    if action == "fallback" and check.backend != "native":
        with _lock:
            first = check.site not in _overrides
            _overrides[check.site] = "native"
            _actions[check.site] = "moved to native"
        hooks.set_site_override(check.site, "native")
        # In the dtype and on the device of the call's value (what a right output has), not of what came back.
        fixed = ref.to(device=record.value.device, dtype=record.value.dtype)
        if first:
            warnings.warn(
                what + "; this call's output was replaced by the reference and the module runs on 'native' for the "
                "rest of the run (--verify-action=fallback)",
                AttnpatchWarning,
                stacklevel=_user_stacklevel(),
            )
        return fixed
    with _lock:
        first = check.site not in _actions
        _actions.setdefault(check.site, "warned")
    if first:
        hint = "" if action == "warn" else " (already on 'native': nothing to fall back to)"
        warnings.warn(
            what + hint + ". Shown once per module; --verify-action=fallback moves such modules to native",
            AttnpatchWarning,
            stacklevel=_user_stacklevel(),
        )
    return None


def _user_stacklevel() -> int:
    # Point the warning at the first frame outside attnpatch (and wrapt's wrappers), i.e. the model code whose
    # attention call failed, not at this module.
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name == "attnpatch" or name.startswith(("attnpatch.", "wrapt"))):
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return 1


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "attnpatch verify: no attention call was checked"
    failed = sum(r["failed"] for r in rows)
    header = ["module", "backend", "checked", "failed", "max abs", "max rel", "worst/tol", "action"]
    table = [header]
    for r in rows:
        table.append(
            [
                r["site"],
                ",".join(r["backends"]),
                str(r["checked"]),
                str(r["failed"]),
                f"{r['max_abs']:.2e}",
                f"{r['max_rel']:.2e}",
                f"{r['worst']:.3g}",
                r["action"] or "-",
            ]
        )
    lines = [f"attnpatch verify: {sum(r['checked'] for r in rows)} calls checked, {failed} outside tolerance"]
    return "\n".join(lines + align(table))


def summary() -> dict[str, Any]:
    """JSON-ready results: settings, per-module rows and every check."""
    settings = _settings
    return {
        "every": settings.every if settings else None,
        "action": settings.action if settings else None,
        "sites": site_summary(),
        "checks": [asdict(c) | {"ok": c.ok} for c in results()],
    }


def _at_exit() -> None:
    if _settings is None or report.enabled():
        return  # the report shows the verify columns
    try:
        print(format_table(site_summary()), file=sys.stderr)
    except Exception as exc:  # never turn a finished run into a crash at interpreter exit
        print(f"attnpatch verify: could not print the summary: {type(exc).__name__}: {exc}", file=sys.stderr)
