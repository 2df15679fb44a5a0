"""``python -m attnpatch list``: every backend, whether it runs here (or why not, with the fix), what it serves."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from attnpatch.backends import hub
from attnpatch.core import registry
from attnpatch.core.call import dtype_name
from attnpatch.core.registry import Backend


def main(argv: Sequence[str]) -> int:
    """Print every backend: availability here (or why not, with the fix) and what it can serve."""
    parser = argparse.ArgumentParser(prog="python -m attnpatch list", description=main.__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--available", action="store_true", help="only backends that can run here")
    opts = parser.parse_args(list(argv))

    backends = [b for b in registry.list_backends() if b.available or not opts.available]
    rows = [_describe(b) for b in backends]
    if opts.json:
        print(json.dumps(rows, indent=2))  # flags as JSON true/false
        return 0
    columns = [
        "name",
        "family",
        "available",
        "devices",
        "dtypes",
        "head_dim",
        "masks",
        "gqa",
        "causal",
        "dropout",
        "backward",
        "lossy",
    ]
    table = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    unavailable = [b for b in backends if b.reasons]  # none with --available: only what runs here
    if unavailable:
        print("\nnot available here:")
        for b in unavailable:
            print(f"  {b.name}: {'; '.join(b.reasons)}")
    shown = {b.name for b in backends}
    aliases = {alias: target for alias, target in registry.aliases().items() if target in shown}
    if aliases:
        print("\naliases: " + ", ".join(f"{a} -> {t}" for a, t in sorted(aliases.items())))
    sources = [f"  {n}: {hub.KERNELS[n].repo_id}@{hub.revision(n)}" for n in hub.KERNELS if n in shown]
    if sources:  # the commit when python -m attnpatch hub lock fixed one
        print("\nHub kernels (repository@revision):\n" + "\n".join(sources))
    print("\nplus 'auto' (best available backend per call) and chains like 'sage,flash,native'.")
    return 0


def _describe(backend: object) -> dict[str, object]:
    assert isinstance(backend, Backend)
    caps = backend.caps
    head_dim = f"{caps.min_head_dim}-{caps.max_head_dim}" if caps.max_head_dim else f">={caps.min_head_dim}"
    if caps.head_dim_multiple > 1:
        head_dim += f" %{caps.head_dim_multiple}"
    return {
        "name": backend.name,
        "family": backend.family,
        "available": backend.available,
        "reasons": list(backend.reasons),
        "devices": "/".join(sorted(caps.devices)) if caps.devices else "any",
        "dtypes": "/".join(sorted(dtype_name(d).replace("float", "f") for d in caps.dtypes)) if caps.dtypes else "any",
        "head_dim": head_dim,
        "masks": "/".join(sorted(m for m in caps.masks if m != "none")) or "none",
        "gqa": caps.gqa,
        "causal": caps.causal,
        "dropout": caps.dropout,
        "backward": caps.backward,
        "lossy": caps.lossy,
        "description": backend.description,
    }


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
