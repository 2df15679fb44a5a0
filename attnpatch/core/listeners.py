"""Change notification between core modules: the registry, the selection settings and the hooks tell their
listeners (the dispatcher, which keeps mirrors and caches of their state) when that state changed.

A module keeps one :class:`Listeners`, hands its ``add`` out as its public ``on_change`` and calls it after each
change.
"""

from __future__ import annotations

from collections.abc import Callable


class Listeners:
    """The functions to call, in the order they were added, after a change."""

    __slots__ = ("_listeners",)

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []

    def add(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def __call__(self) -> None:
        for listener in self._listeners:
            listener()
