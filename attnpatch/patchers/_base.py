"""What every patcher shares: the :class:`Patcher` base, one patch set, one post-import hook, one code scanner.

A patcher module (diffusers.py, transformers.py) defines a :class:`Patcher` subclass and one instance of it,
``PATCHER``, which :mod:`attnpatch.api` drives without knowing the library:

- ``requires()``: reasons the library cannot be patched here (not installed); empty = it can.
- ``install()`` / ``uninstall()``: idempotent and thread-safe; ``_install`` / ``_uninstall`` do the work.
  Installing routes nothing by itself: a wrapper routes a call only for a marked layer (``MODULE_ATTR``) or while
  routing is process-wide (``state.route_all``).
- ``attention_modules(root)``: (qualified name, module) of the attention layers in ``root`` that are routed.
- ``skipped_modules(root)``: (qualified name, why) of attention layers that are left alone.
- ``unsupported()``: reasons the installed library version cannot be (fully) patched.

Replaced functions and attributes go through a :class:`PatchSet`, which puts back only what is still ours: a
function another tool replaced after us stays theirs.
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

from attnpatch.core import forksafe
from attnpatch.core.versions import installed as module_installed
from attnpatch.errors import AttnpatchWarning


class PatchSet:
    """Attributes and mapping entries replaced by a patcher, restorable in reverse order."""

    def __init__(self) -> None:
        self._patches: list[tuple[Any, str, Any, Any, bool]] = []

    @staticmethod
    def lookup(owner: Any, name: str, mapping: bool = False) -> Any:
        """What ``owner.name`` (``owner[name]`` for a mapping) is now; a class's own attribute, not a base's."""
        if mapping:
            return owner.get(name)
        if isinstance(owner, type):
            return owner.__dict__.get(name)
        return getattr(owner, name, None)

    def replace(self, owner: Any, name: str, new: Any, mapping: bool = False) -> Any:
        """Set ``owner.name`` (or ``owner[name]``) to ``new``; returns the original."""
        original = self.lookup(owner, name, mapping)
        self._patches.append((owner, name, original, new, mapping))
        if mapping:
            owner[name] = new
        else:
            setattr(owner, name, new)
        return original

    def entries(self) -> list[tuple[Any, str, Any]]:
        """(owner, name, our replacement) of every patch in place, oldest first."""
        return [(owner, name, ours) for owner, name, _, ours, _ in self._patches]

    def patched(self, owner: Any, name: str, mapping: bool = False) -> bool:
        return any(o is owner and n == name and m == mapping for o, n, _, _, m in self._patches)

    def restore(self) -> None:
        """Put every original back, newest first, where our replacement is still in place."""
        while self._patches:
            owner, name, original, ours, mapping = self._patches.pop()
            if self.lookup(owner, name, mapping) is not ours:
                continue  # replaced again after us (another tool): leave theirs in place
            if mapping:
                owner[name] = original
            else:
                setattr(owner, name, original)


def code_names(code: types.CodeType) -> list[str]:
    """Global and attribute names used by ``code`` and the code nested in it (comprehensions, closures)."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(code_names(const))
    return names


class Patcher:
    """Base of the library patchers (see the module docstring)."""

    #: The top-level module of the library this patcher patches.
    library = ""

    def __init__(self) -> None:
        self.lock = forksafe.Lock(reentrant=True)  # free again in a forked child
        self.patches = PatchSet()  # what install replaced; _uninstall restores it
        self._installed = False
        self._hooked: set[str] = set()

    def requires(self) -> list[str]:
        if not module_installed(self.library):
            return [f"{self.library} is not installed"]
        return []

    def install(self) -> None:
        with self.lock:
            if self._installed:
                return
            self._installed = True
            self._install()

    def uninstall(self) -> None:
        with self.lock:
            if not self._installed:
                return
            self._installed = False
            self._uninstall()

    def installed(self) -> bool:
        return self._installed

    def when_imported(self, name: str, hook: Callable[[types.ModuleType], None]) -> None:
        """Run ``hook(module)`` now if ``name`` is imported, else at the end of its import.

        wrapt fires a post-import hook before any ``from name import x`` in a consumer completes, so an early
        patch is seen everywhere. Its hooks are one-shot and cannot be removed, so each name is registered once
        per process and the hooks check :meth:`installed` when they fire.
        """
        module = sys.modules.get(name)
        if module is not None:
            hook(module)
            return
        if name in self._hooked:
            return  # a hook is already waiting for this module
        self._hooked.add(name)
        import wrapt

        def fire(module: types.ModuleType) -> None:
            self._hooked.discard(name)
            try:
                hook(module)
            except Exception as exc:  # never break the user's import: the library loads unpatched, said once
                warnings.warn(
                    f"attnpatch: patching {name} failed ({type(exc).__name__}: {exc}); it runs unpatched. "
                    "Please report this with your diffusers/transformers versions.",
                    AttnpatchWarning,
                    stacklevel=2,
                )

        wrapt.register_post_import_hook(fire, name)

    # ----- what a library's patcher provides

    def _install(self) -> None:
        raise NotImplementedError

    def _uninstall(self) -> None:
        raise NotImplementedError

    def attention_modules(self, root: Any) -> list[tuple[str, Any]]:
        raise NotImplementedError

    def skipped_modules(self, root: Any) -> list[tuple[str, str]]:
        return []

    def unsupported(self) -> list[str]:
        return []
