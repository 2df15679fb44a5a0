"""``python -m attnpatch cache show|clear|dir``: look at or delete the autotune cache (attnpatch/autotune.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from attnpatch import autotune


def main(argv: Sequence[str]) -> int:
    """``python -m attnpatch cache show|clear|dir``: look at or delete the autotune cache."""
    parser = argparse.ArgumentParser(
        prog="python -m attnpatch cache",
        description="Show or clear the autotune cache (" + "ATTNPATCH_CACHE_DIR overrides its folder).",
    )
    parser.add_argument("action", choices=["show", "clear", "dir"], help="show entries, delete them, print the folder")
    parser.add_argument("--json", action="store_true", help="show: print the cache files as JSON")
    opts = parser.parse_args(list(argv))
    folder = autotune.cache_dir()
    files = sorted(folder.glob("autotune-*.json")) if folder.is_dir() else []
    if opts.action == "dir":
        print(folder)
        return 0
    if opts.action == "clear":
        for path in files:
            path.unlink(missing_ok=True)
        print(f"removed {len(files)} autotune cache file{'s' * (len(files) != 1)} from {folder}")
        return 0
    contents = {str(path): autotune.read_cache(path) for path in files}
    if opts.json:
        print(json.dumps(contents, indent=2))
        return 0
    if not files:
        print(f"autotune cache is empty ({folder})")
        return 0
    for name, data in contents.items():
        versions = data.get("env", {})
        entries = data.get("entries", {})
        print(name)
        print(f"  attnpatch {versions.get('attnpatch')}, torch {versions.get('torch')}, {versions.get('device')}")
        width = max((len(k) for k in entries), default=0)
        for kind, entry in sorted(entries.items()):
            times = ", ".join(f"{n} {t:g} ms" for n, t in sorted(entry.get("times_ms", {}).items(), key=lambda i: i[1]))
            print(f"  {kind:<{width}}  -> {entry.get('backend')}  ({times})")
    return 0
