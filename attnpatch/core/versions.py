"""Versions of installed packages, read without importing them (the registry, the patchers and the backends).

Once a module is imported, its ``__version__`` is the version that runs: it wins over the distribution metadata,
which can belong to another copy (a source tree on sys.path, a test fake standing in for an installed package).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.8.3.post1+cu12"`` -> ``(2, 8, 3)``: the leading numeric parts, for comparisons."""
    parts: list[int] = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def distribution_version(distribution: str) -> str | None:
    """The installed version of the distribution ``distribution`` (a pip name), or None without metadata."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_version(module: str, distribution: str) -> str | None:
    """The version of ``module``: the imported module's ``__version__``, else its distribution's metadata."""
    found = getattr(sys.modules.get(module), "__version__", None)
    if isinstance(found, str):
        return found
    return distribution_version(distribution)
