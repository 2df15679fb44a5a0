"""Command line: ``python -m attnpatch`` / ``attnpatch``. One module per subcommand, imported only when used.

``list``, ``bench`` (``bench --overhead``: overhead.py), ``demo``, ``cache``, ``hub`` and ``tune`` are subcommands;
anything else is the runner (``python -m attnpatch [options] script.py [args]``, run.py). Each module's
``main(argv) -> int`` takes the arguments after the subcommand and returns the exit status. Adding a subcommand: a
module here with ``main`` and a line in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

# subcommand -> module of attnpatch.cli whose main(argv) runs it
SUBCOMMANDS = {"list": "backends", "bench": "bench", "demo": "demo", "cache": "cache", "hub": "hub", "tune": "tune"}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"] and "--overhead" in args:
        return _run("overhead", [a for a in args[1:] if a != "--overhead"])
    if args and args[0] in SUBCOMMANDS:
        return _run(SUBCOMMANDS[args[0]], args[1:])
    return int(importlib.import_module(f"{__name__}.run").main(args) or 0)


def _run(module: str, argv: list[str]) -> int:
    try:
        return int(importlib.import_module(f"{__name__}.{module}").main(argv) or 0)
    except BrokenPipeError:
        # `python -m attnpatch list | head -1`: the reader is gone, which is not an error. Point stdout at devnull
        # so the interpreter's own flush at exit does not raise again (the recipe in Python's signal docs).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
