"""Versions of installed packages, read without importing them (the registry, the patchers and the backends).

Once a module is imported, its ``__version__`` is the version that runs: it wins over the distribution metadata,
which can belong to another copy (a source tree on sys.path, a test fake standing in for an installed package).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.8.3.post1+cu12"`` -> ``(2, 8, 3)``: the release numbers, for comparisons. A pre-release keeps its
    release's numbers (``"2.2.0rc1"`` and ``"0.36.0.dev0"`` -> ``(2, 2, 0)``, ``(0, 36, 0)``): a minimum version
    is checked with :func:`older_than`, which puts pre-releases before their release."""
    parts: list[int] = []
    for piece in version.split("+")[0].split("."):
        digits = piece[: len(piece) - len(piece.lstrip("0123456789"))]
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):  # "0rc1", "0b40": the release ends here
            break
    return tuple(parts)


def is_prerelease(version: str) -> bool:
    """Whether ``version`` is a pre-release or development release (``"2.2.0rc1"``, ``"4.0.0b40"``,
    ``"0.36.0.dev0"``), which pip orders before its release."""
    release = ".".join(map(str, version_tuple(version)))
    rest = version.split("+")[0][len(release) :].lstrip(".-_").lower()
    return rest.startswith(("a", "b", "c", "rc", "pre", "dev"))


def older_than(version: str, minimum: str) -> bool:
    """``version < minimum`` as pip orders them, for releases and their pre-releases: ``"2.2.0rc1"`` is older than
    ``"2.2.0"`` and ``"2.2"``, ``"2.2.0.post1"`` is not."""
    found, wanted = version_tuple(version), version_tuple(minimum)
    width = max(len(found), len(wanted))
    found, wanted = found + (0,) * (width - len(found)), wanted + (0,) * (width - len(wanted))
    if found != wanted:
        return found < wanted
    return is_prerelease(version) and not is_prerelease(minimum)


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
