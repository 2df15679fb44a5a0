"""Autotune for ``auto``: time the backends that can serve a call, keep the fastest, remember it on disk.

Turn it on with ``python -m attnpatch script.py --backend auto --autotune``, ``ATTNPATCH_AUTOTUNE=1`` or
``attnpatch.autotune.enable()``. Without it, ``auto`` takes the first candidate in the priority order the
backends declare.

What is tuned: the first call of each *kind* picks among :func:`attnpatch.core.dispatch.auto_candidates` (available,
able to serve the call, not lossy unless allowed). A kind is (device, dtype, shape bucket, mask kind, causal,
dropout, grad) where the shape bucket keeps batch, heads, head dims and rounds each sequence length up to a power
of two. Each candidate runs on the call's own tensors once to warm up (compiled kernels compile here), then is
timed in interleaved rounds (CUDA events on a GPU) until 25 ms or 10 rounds, at least 3, and the fastest
run of each decides. Timing runs use
``torch.no_grad`` and leave the random number generators as they were. A candidate that raises is skipped and
the error shown. One line per tuned kind goes to stderr, so a long first step shows progress.

The cache: in memory, and on disk in ``$ATTNPATCH_CACHE_DIR`` or the user cache dir (``~/.cache/attnpatch``,
``~/Library/Caches/attnpatch``, ``%LOCALAPPDATA%\\attnpatch\\Cache``), one file per (attnpatch version, torch
version, device) named ``autotune-<hash>.json``. A file is rewritten after each tuned kind, so Ctrl-C keeps what
was measured. ``python -m attnpatch cache show`` lists it; ``python -m attnpatch cache clear`` deletes it.

:func:`measure` times candidates and measures their error against float64 on one call's inputs: what
``python -m attnpatch tune`` writes into an attention plan (docs/plans.md).

Cache file schema ``attnpatch.autotune/1``::

    {"schema": "attnpatch.autotune/1",
     "env": {"attnpatch": "0.1.0", "torch": "2.13.0", "device": "NVIDIA H100 80GB HBM3 (sm90, CUDA 12.8)"},
     "entries": {"<kind>": {"backend": "flash", "times_ms": {"flash": 1.21, "native": 1.50},
                            "errors": {"flex": "RuntimeError: ..."}}}}
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from attnpatch import env
from attnpatch.core import forksafe, hooks
from attnpatch.core.call import CallSpec, dtype_name
from attnpatch.core.registry import Backend
from attnpatch.errors import AttnpatchWarning

SCHEMA = "attnpatch.autotune/1"
_WARMUP = 1
_MIN_RUNS, _MAX_RUNS, _BUDGET_S = 3, 10, 0.025

_lock = forksafe.Lock(reentrant=True)
_memory: dict[str, dict[str, Any]] = {}  # kind -> entry (what was tuned or loaded this process)
_loaded: set[Path] = set()
_enabled = False
_use_disk = True
_progress = True


def enable(*, disk: bool = True, progress: bool = True) -> None:
    """Let ``auto`` time its candidates per call kind (see the module docstring). Idempotent.

    disk: read and write the on-disk cache (off: tune in memory only).
    progress: print one line per tuned kind to stderr.
    """
    global _enabled, _use_disk, _progress
    _use_disk, _progress = disk, progress
    hooks.set_auto_chooser(choose)
    _enabled = True


def disable() -> None:
    """``auto`` goes back to the priority order; the in-memory cache is dropped (the disk cache stays)."""
    global _enabled
    if hooks.auto_chooser() is choose:
        hooks.set_auto_chooser(None)
    _enabled = False
    with _lock:
        _memory.clear()
        _loaded.clear()


def enabled() -> bool:
    return _enabled


def cache_dir() -> Path:
    """``$ATTNPATCH_CACHE_DIR``, else the platform's user cache dir + ``attnpatch``."""
    configured = env.raw("ATTNPATCH_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "attnpatch" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "attnpatch"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnpatch"


def device_description(device: torch.device) -> str:
    """What makes timings on ``device`` comparable: GPU name, compute capability and CUDA, or CPU and threads."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} (sm{major}{minor}, CUDA {torch.version.cuda})"
    if device.type == "cpu":
        cpu = platform.processor() or platform.machine()
        return f"cpu {cpu} ({torch.get_num_threads()} threads)"
    return device.type


def environment(device: torch.device) -> dict[str, str]:
    from attnpatch import __version__

    return {"attnpatch": __version__, "torch": torch.__version__, "device": device_description(device)}


def cache_file(device: torch.device) -> Path:
    digest = hashlib.sha1(json.dumps(environment(device), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"autotune-{digest}.json"


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def kind_of(call: CallSpec, batch: int) -> str:
    """The cache key of a call: device, dtype, shape bucket, mask kind and flags (CallSpec has no batch size)."""
    return (
        f"{call.device_type} {dtype_name(call.dtype)} b{_pow2(batch)} h{call.heads_q}/{call.heads_kv}"
        f" d{call.head_dim}/{call.head_dim_v} s{_pow2(call.seq_q)}x{_pow2(call.seq_kv)} mask={call.mask_kind}"
    ) + "".join(f" {word}" for word in call.flags("is_causal", "dropout", "needs_grad"))


def choose(call: CallSpec, candidates: list[Backend], args: tuple[Any, ...]) -> Backend:
    """The dispatcher's auto chooser (see attnpatch.core.hooks): the cached or freshly timed fastest candidate."""
    query = args[0]
    kind = kind_of(call, query.shape[0])
    names = [b.name for b in candidates]
    with _lock:
        entry = _lookup(kind, query.device)
        if entry is None or entry.get("backend") not in names:
            entry = _tune(kind, candidates, args)
    chosen = entry.get("backend")
    for backend in candidates:
        if backend.name == chosen:
            return backend
    return candidates[0]


def _lookup(kind: str, device: torch.device) -> dict[str, Any] | None:
    entry = _memory.get(kind)
    if entry is not None or not _use_disk:
        return entry
    path = cache_file(device)
    if path not in _loaded:
        _loaded.add(path)
        _memory.update(read_cache(path).get("entries", {}))
    return _memory.get(kind)


def read_cache(path: Path) -> dict[str, Any]:
    """The cache file at ``path`` as {"schema", "env", "entries"}, with only well-formed entries; {} if unusable.

    A file that cannot be read, is not our schema, or holds entries of the wrong types (a corrupt or crafted file;
    deeply nested JSON included) is ignored with one warning and rewritten by the next save: it never raises into
    an attention call or ``cache show``.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        _warn_bad_cache(path, f"{type(exc).__name__}: {str(exc)[:200]}")
        return {}
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), dict):
        _warn_bad_cache(path, f"not an {SCHEMA} file")
        return {}
    entries = {kind: entry for kind, entry in data["entries"].items() if _well_formed(kind, entry)}
    if len(entries) != len(data["entries"]):
        _warn_bad_cache(path, f"{len(data['entries']) - len(entries)} malformed entries dropped")
    env = data.get("env")
    return {"schema": SCHEMA, "env": env if isinstance(env, dict) else {}, "entries": entries}


def _well_formed(kind: object, entry: object) -> bool:
    if not isinstance(kind, str) or not isinstance(entry, dict) or not isinstance(entry.get("backend"), str):
        return False
    times = entry.get("times_ms", {})
    return isinstance(times, dict) and all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) for k, v in times.items()
    )


_warned_paths: set[Path] = set()


def _warn_bad_cache(path: Path, why: str) -> None:
    if path in _warned_paths:
        return
    _warned_paths.add(path)
    warnings.warn(
        f"attnpatch autotune: ignoring the cache file {path} ({why}); it will be rewritten "
        "(python -m attnpatch cache clear removes it)",
        AttnpatchWarning,
        stacklevel=2,
    )


def _tune(kind: str, candidates: list[Backend], args: tuple[Any, ...]) -> dict[str, Any]:
    query = args[0]
    _say(f"attnpatch autotune: timing {len(candidates)} backends for {kind} ...", end="")
    devices = [query.device] if query.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        times, errors = time_backends(candidates, args)
    best = min(times, key=times.__getitem__) if times else candidates[0].name
    entry = {"backend": best, "times_ms": {n: round(t * 1e3, 4) for n, t in times.items()}, "errors": errors}
    _memory[kind] = entry
    ranking = ", ".join(f"{n} {t * 1e3:.3g} ms" for n, t in sorted(times.items(), key=lambda item: item[1]))
    failed = "".join(f"; {n} failed ({e})" for n, e in errors.items())
    where = ""
    if _use_disk:
        path = _save(query.device, kind, entry)
        where = f" (cached in {path})" if path else ""
    _say(f" {ranking}{failed} -> {best}{where}")
    return entry


def time_backends(
    backends: list[Backend],
    args: tuple[Any, ...],
    *,
    min_runs: int = _MIN_RUNS,
    max_runs: int = _MAX_RUNS,
    budget_s: float = _BUDGET_S,
) -> tuple[dict[str, float], dict[str, str]]:
    """({name: seconds}, {name: error}): fastest run of each backend on ``args`` after one warm-up run.

    Rounds interleave the backends (each runs once per round) until ``min_runs`` rounds and ``budget_s`` seconds
    or ``max_runs`` rounds have passed (3, 25 ms, 10), and the minimum per backend is kept: on a busy machine a
    single run can stall for a scheduler tick, and interleaving spreads slow phases over every backend alike. CUDA
    events time GPU runs.
    """
    fns = {}
    errors: dict[str, str] = {}
    for backend in backends:
        fn = backend.fn
        try:
            for _ in range(_WARMUP):
                fn(*args)
        except Exception as exc:  # a candidate that fails is skipped, never the user's call
            errors[backend.name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        else:
            fns[backend.name] = fn
    samples: dict[str, list[float]] = {name: [] for name in fns}
    rounds, spent = 0, 0.0
    while fns and (rounds < min_runs or (rounds < max_runs and spent < budget_s)):
        for name, fn in fns.items():
            seconds = time_call(fn, args)
            samples[name].append(seconds)
            spent += seconds
        rounds += 1
    return {name: min(times) for name, times in samples.items()}, errors


def measure(backends: list[Backend], args: tuple[Any, ...]) -> dict[str, dict[str, Any]]:
    """Each backend's fastest run on ``args`` and its error against float64, for plans (``attnpatch tune``).

    args: the dispatcher's call, ``(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)`` with
    query (batch, seq_q, heads, head_dim). Returns ``{name: {"seconds", "max_abs_err", "max_rel_err",
    "within_tolerance"}}``, or ``{name: {"error": why}}`` for a backend that raised, returned a wrong shape or NaN.
    The reference is :func:`attnpatch.verify.reference`; the first run of each backend gives its error (and warms
    it up), then :func:`time_backends` times them (5 to 30 rounds, up to 0.1 s). Runs under ``torch.no_grad`` and
    leaves the RNGs as they were.
    """
    from attnpatch import verify

    query, key, value, attn_mask, _, is_causal, scale, _ = args
    results: dict[str, dict[str, Any]] = {}
    usable = []
    devices = [query.device] if query.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        ref = verify.reference(query, key, value, attn_mask, is_causal, scale)
        for backend in backends:
            try:
                out = backend.fn(*args)
            except Exception as exc:  # a candidate that fails is measured as failing, never the user's call
                results[backend.name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
                continue
            problem = verify.output_problem(out, ref)
            atol, rtol = backend.caps.tolerance_for(query.dtype, scale, query.shape[-1])
            max_abs, max_rel, worst = (0.0, 0.0, 0.0) if problem else verify.compare(out, ref, atol, rtol)
            if problem or max_abs != max_abs:
                results[backend.name] = {"error": problem or "the output holds NaN"}
                continue
            results[backend.name] = {"max_abs_err": max_abs, "max_rel_err": max_rel, "within_tolerance": worst <= 1}
            usable.append(backend)
        # More rounds than autotune's: a plan is measured once and kept, and on a loaded CPU a run that waits for a
        # descheduled worker thread takes a scheduler tick; the minimum of many runs is the one that did not.
        times, errors = time_backends(usable, args, min_runs=5, max_runs=30, budget_s=0.1)
    for name, seconds in times.items():
        results[name] = {"seconds": seconds, **results[name]}
    for name, error in errors.items():
        results[name] = {"error": error}
    return results


def time_call(fn: Any, args: tuple[Any, ...]) -> float:
    """Seconds of one ``fn(*args)``: CUDA events when the first argument is on a GPU, else the wall clock."""
    if args[0].is_cuda:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        stop.record()
        stop.synchronize()
        return float(start.elapsed_time(stop)) / 1e3
    began = time.perf_counter()
    fn(*args)
    return time.perf_counter() - began


def _save(device: torch.device, kind: str, entry: dict[str, Any]) -> Path | None:
    # Merge with what another process may have written meanwhile, then replace the file atomically.
    path = cache_file(device)
    data = read_cache(path)
    entries = data.get("entries", {}) if data else {}
    entries[kind] = entry
    payload = {"schema": SCHEMA, "env": environment(device), "entries": entries}
    try:
        # The folder private to the user (0700 when we create it); the file written under a fresh private name
        # (mkstemp: exclusive create, mode 0600, never through a symlink planted in its place), then renamed.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(payload, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        _say(
            f"\nattnpatch autotune: cannot write the cache {path} ({exc}); set ATTNPATCH_CACHE_DIR to a writable folder"
        )
        return None
    return path


def _say(text: str, end: str = "\n") -> None:
    if _progress:
        print(text, end=end, file=sys.stderr, flush=True)
