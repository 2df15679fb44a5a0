"""Put first on PYTHONPATH by ``python -m attnpatch``, so the interpreters a script starts are patched too.

It activates attnpatch from the ATTNPATCH_* variables the runner set (see attnpatch.startup), then runs the
sitecustomize it shadows (Debian and Ubuntu ship one; a conda or corporate image may too). Under ``python -E``,
``-I`` or ``-S`` it is not loaded at all: the attnpatch-startup.pth line an install puts in site-packages still
runs under -E and -I.
"""

import os
import sys


def _activate() -> None:
    if not (os.environ.get("ATTNPATCH_BACKEND") or os.environ.get("ATTNPATCH_PLAN")):
        return
    try:
        import attnpatch.startup
    except Exception as exc:  # an interpreter that cannot import attnpatch runs unpatched, and says so
        sys.stderr.write(f"attnpatch: {sys.executable} cannot import attnpatch ({exc}); running unpatched\n")
    else:
        attnpatch.startup.run()


def _run_shadowed() -> None:
    # The sitecustomize we shadow is the next one on sys.path after our own folder. Searching only after it
    # (not everywhere but it) keeps two copies of this file on the path from running each other forever.
    import importlib.machinery
    import importlib.util

    here = os.path.realpath(os.path.dirname(__file__))
    entries = [os.path.realpath(entry or os.curdir) for entry in sys.path]
    after = sys.path[entries.index(here) + 1 :] if here in entries else sys.path
    spec = importlib.machinery.PathFinder.find_spec(__name__, after)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module
    spec.loader.exec_module(module)


_activate()
_run_shadowed()
