"""One patcher per library (diffusers.py, transformers.py), plus the scoped F.sdpa redirect (sdpa.py).

The contract every patcher module follows, so that :mod:`attnpatch.api` can drive them without knowing them:

- ``install()``: idempotent. Registers wrapt post-import hooks so the wrappers go in when the library is
  imported (or patches at once if it already is). Installing routes nothing by itself: see below.
- ``uninstall()``: idempotent. Restores every original function and class attribute (bitwise-identical results).
- ``attention_modules(root) -> list[(qualified_name, module)]``: the attention layers of this library inside
  ``root`` that the patcher routes; ``apply`` marks exactly these.
- ``unsupported() -> list[str]``: reasons the installed library version cannot be (fully) patched.

A wrapper routes a call into the dispatcher only when the attention layer carries a mark (``MODULE_ATTR``, set by
apply / set_attention_backend), routing is process-wide (``state.route_all``, set by ``install()`` and the
startup hook), or an ``attention_backend()`` block is active on the calling thread; otherwise it calls the
original code untouched.
"""

from __future__ import annotations

import weakref
from typing import Any

# Instance attribute on an attention layer: the selection string (e.g. "sage,native") from apply /
# set_attention_backend, or FOLLOW. A string, not a resolved chain, so deepcopy and pickling of the model keep working.
MODULE_ATTR = "_attnpatch_backend"
# Instance attribute on an attention layer: its qualified name for the report ("transformer.blocks.0.attn"); set by
# apply, or by the patchers at the layer's first routed call (patchers/_layers.py).
SITE_ATTR = "_attnpatch_site"
# Instance attribute on a marked layer: a Keeper, which tells api that a routed layer still exists (see Keeper).
KEEPER_ATTR = "_attnpatch_keeper"
# The mark of a layer applied without a backend: routed, with the selection of the attention_backend() block or the
# process default at the time of each call.
FOLLOW = ""


class state:  # noqa: N801 - a namespace of process-wide switches
    # True after install(backend=...) / the startup hook: every attention call is routed, marked or not.
    route_all: bool = False


_keepers: weakref.WeakSet[Keeper] = weakref.WeakSet()


class Keeper:
    """Lives on a marked layer while the mark does: api uninstalls the patchers only once no Keeper is alive.

    api cannot see copies it did not make: a deepcopy of an applied model (an EMA copy) carries the marks, and its
    layers must keep routing after the original is unapplied. ``copy.deepcopy`` copies a Keeper through
    ``__deepcopy__``, which registers the new one. A pickle (``torch.save``) stores ``False`` instead: loading a
    model must not need attnpatch, and such a model routes only while something else keeps the patchers installed.
    """

    def __init__(self) -> None:
        _keepers.add(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> Keeper:
        return Keeper()

    def __reduce__(self) -> tuple[type[bool], tuple[()]]:
        return (bool, ())


def marks_alive() -> bool:
    """Whether any marked layer (an applied model or a deepcopy of one) is still alive."""
    return len(_keepers) > 0
