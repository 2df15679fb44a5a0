"""Exceptions and warnings raised by attnpatch.

Every message is one line that names the value, the rule it broke and the fix, so that a user reading a
traceback (or a log line from the startup hook) knows what to change without reading our source.
"""

from __future__ import annotations


def shown(value: object, limit: int = 300) -> str:
    """``repr(value)``, or its start and length when it is long: a message naming a value stays one readable line
    (a pasted file in ATTNPATCH_BACKEND once made a 201 KB "one line")."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(str(value))} characters)"


class AttnpatchError(Exception):
    """Base class of every error attnpatch raises on purpose."""


class UnknownBackendError(AttnpatchError, ValueError):
    """A backend name that is neither registered nor an alias."""


class BackendUnavailable(AttnpatchError):
    """A backend exists but cannot run in this process (package missing, wrong device, too old)."""


class CheckFailed(AttnpatchError, ValueError):
    """A debug check (``ATTNPATCH_CHECKS=1`` / ``set_checks(True)``) found bad input."""


class UnsupportedCall(AttnpatchError):
    """No backend of the selected chain can serve this call (raised in strict mode, or when the chain is empty).

    ``reasons`` maps each candidate backend name to the reasons it refused the call (an empty list means it could
    have served it but was not reached).
    """

    def __init__(self, message: str, reasons: dict[str, list[str]]) -> None:
        super().__init__(message)
        self.reasons = reasons

    def __reduce__(self) -> tuple[type[UnsupportedCall], tuple[str, dict[str, list[str]]]]:
        # Exceptions pickle as cls(*self.args); ours takes a second argument, so say it. Without this a strict
        # refusal inside a multiprocessing worker cannot be unpickled in the parent, whose pool then hangs.
        return (type(self), (str(self), self.reasons))


class AttnpatchWarning(UserWarning):
    """Category of attnpatch's warnings (fallbacks, passthroughs, startup problems), filterable as a group."""
