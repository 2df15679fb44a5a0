"""Versions of installed packages, read without importing them (the registry, the patchers and the backends).

Once a module is imported, its ``__version__`` is the version that runs: it wins over the distribution metadata,
which can belong to another copy (a source tree on sys.path, a test fake standing in for an installed package).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
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
    pre_rank, _, _, dev = _suffix_key(version)
    return pre_rank != _MANY or dev != _MANY


# What may follow the release numbers (PEP 440, any case and separators): a pre-release, a post-release, a
# development release, in that order.
_SUFFIX = re.compile(
    r"(?:[-_.]?(?P<pre>alpha|beta|preview|pre|rc|a|b|c)[-_.]?(?P<pre_n>\d*))?"
    r"(?:[-_.]?(?:post|rev|r)[-_.]?(?P<post_n>\d*))?"
    r"(?:[-_.]?dev[-_.]?(?P<dev_n>\d*))?"
)
_PRE_RANK = {"alpha": 1, "a": 1, "beta": 2, "b": 2, "c": 3, "rc": 3, "pre": 3, "preview": 3}
_MANY = 1 << 62  # after any number: a release with no such part sorts after those with one


def _suffix_key(version: str) -> tuple[int, ...]:
    # pip's order after equal release numbers: 1.0.dev1 < 1.0a1.dev1 < 1.0a1 < 1.0a1.post1 < 1.0b1 < 1.0rc1 < 1.0
    # < 1.0.post1.dev1 < 1.0.post1. Something unreadable after the release sorts as the release itself.
    release = ".".join(map(str, version_tuple(version)))
    rest = version.split("+")[0].strip().lower()[len(release) :]
    found = _SUFFIX.fullmatch(rest)
    if found is None:
        return (_MANY, 0, -1, _MANY)
    pre, post, dev = found["pre"], found["post_n"], found["dev_n"]
    if pre is not None:
        pre_key = (_PRE_RANK[pre], int(found["pre_n"] or 0))
    elif post is None and dev is not None:
        pre_key = (-1, 0)  # 1.0.dev1 comes before 1.0a1
    else:
        pre_key = (_MANY, 0)
    post_key = int(post or 0) if post is not None else -1
    dev_key = int(dev or 0) if dev is not None else _MANY
    return (*pre_key, post_key, dev_key)


def older_than(version: str, minimum: str) -> bool:
    """``version < minimum`` as pip orders them: ``"2.2.0rc1"`` is older than ``"2.2.0"`` and ``"2.2"``,
    ``"4.0.0b3"`` than ``"4.0.0b5"``, ``"1.0.dev1"`` than ``"1.0a1"``; ``"2.2.0.post1"`` is not older than
    ``"2.2.0"``. Local versions (``+cu12``) are ignored."""
    found, wanted = version_tuple(version), version_tuple(minimum)
    width = max(len(found), len(wanted))
    found, wanted = found + (0,) * (width - len(found)), wanted + (0,) * (width - len(wanted))
    if found != wanted:
        return found < wanted
    return _suffix_key(version) < _suffix_key(minimum)


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
