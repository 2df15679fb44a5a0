"""Locks that a forked child can take: a fork while another thread holds one would leave the child waiting forever.

``os.fork`` copies a lock in whatever state it is, but not the thread that holds it. The locks made here are
replaced with fresh ones in the child (``os.register_at_fork``), so a child forked while another thread is inside
``apply`` or ``unapply`` (multiprocessing's fork start method) starts with every attnpatch lock free.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any


class Lock:
    """A ``threading.Lock`` (``RLock`` when ``reentrant``) that is replaced by a free one in a forked child."""

    __slots__ = ("__weakref__", "_lock", "_reentrant")

    def __init__(self, reentrant: bool = False) -> None:
        self._reentrant = reentrant
        self._lock: Any = threading.RLock() if reentrant else threading.Lock()
        _all.add(self)

    def __enter__(self) -> bool:
        return bool(self._lock.__enter__())

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)

    def _renew(self) -> None:
        self._lock = threading.RLock() if self._reentrant else threading.Lock()


_all: weakref.WeakSet[Lock] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lock in list(_all):
        lock._renew()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
