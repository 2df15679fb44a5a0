"""Command line: ``python -m attnpatch`` / ``attnpatch``. One module per subcommand, imported only when used.

``list``, ``bench`` (``bench --overhead``: overhead.py), ``demo`` and ``cache`` are subcommands; anything else is the
runner (``python -m attnpatch [options] script.py [args]``, run.py). Each module's ``main(argv) -> int`` takes the
arguments after the subcommand and returns the exit status. Adding a subcommand: a module here with ``main`` and
a line in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> module of attnpatch.cli whose main(argv) runs it
SUBCOMMANDS = {"list": "list", "bench": "bench", "demo": "demo", "cache": "cache"}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"] and "--overhead" in args:
        args = ["overhead", *(a for a in args[1:] if a != "--overhead")]
        return _run("overhead", args[1:])
    if args and args[0] in SUBCOMMANDS:
        return _run(SUBCOMMANDS[args[0]], args[1:])
    return _run("run", args)


def _run(module: str, argv: list[str]) -> int:
    return int(importlib.import_module(f"{__name__}.{module}").main(argv) or 0)
