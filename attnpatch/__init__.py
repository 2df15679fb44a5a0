"""attnpatch: route the attention of existing diffusers and transformers models to the backend you choose.

``import attnpatch`` imports neither torch nor wrapt: the public names below load their module on first use,
so the interpreter-start hook and ``python -m attnpatch --help`` stay cheap.
"""

from __future__ import annotations

import importlib

# `typing` costs ~10 ms to import at interpreter start; the startup hook imports this package, so keep it out.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "AttnpatchError": "attnpatch.errors",
    "AttnpatchWarning": "attnpatch.errors",
    "BackendUnavailable": "attnpatch.errors",
    "CheckFailed": "attnpatch.errors",
    "UnknownBackendError": "attnpatch.errors",
    "UnsupportedCall": "attnpatch.errors",
    "Capabilities": "attnpatch.core.capabilities",
    "get_backend": "attnpatch.core.registry",
    "list_backends": "attnpatch.core.registry",
    "register_backend": "attnpatch.core.registry",
    "unregister_backend": "attnpatch.core.registry",
    "apply": "attnpatch.api",
    "install": "attnpatch.api",
    "reset_attention_backend": "attnpatch.api",
    "set_attention_backend": "attnpatch.api",
    "unapply": "attnpatch.api",
    "uninstall": "attnpatch.api",
    "attention_backend": "attnpatch.api",
    "current_backend": "attnpatch.core.selection",
    "dispatch_attention": "attnpatch.core.dispatch",
    "fallback_counts": "attnpatch.core.dispatch",
    "get_default_backend": "attnpatch.core.selection",
    "set_allow_lossy": "attnpatch.core.selection",
    "set_checks": "attnpatch.core.selection",
    "set_default_backend": "attnpatch.core.selection",
    "set_strict": "attnpatch.core.selection",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attnpatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from attnpatch.api import (
        apply,
        attention_backend,
        install,
        reset_attention_backend,
        set_attention_backend,
        unapply,
        uninstall,
    )
    from attnpatch.core.capabilities import Capabilities
    from attnpatch.core.dispatch import dispatch_attention, fallback_counts
    from attnpatch.core.registry import get_backend, list_backends, register_backend, unregister_backend
    from attnpatch.core.selection import (
        current_backend,
        get_default_backend,
        set_allow_lossy,
        set_checks,
        set_default_backend,
        set_strict,
    )
    from attnpatch.errors import (
        AttnpatchError,
        AttnpatchWarning,
        BackendUnavailable,
        CheckFailed,
        UnknownBackendError,
        UnsupportedCall,
    )
