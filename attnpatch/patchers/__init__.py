"""One patcher per library (diffusers.py, transformers.py), plus the scoped F.sdpa redirect (sdpa.py).

The contract every patcher module follows, so that :mod:`attnpatch.api` can drive them without knowing them:

- ``install()``: idempotent. Registers wrapt post-import hooks so the wrappers go in when the library is
  imported (or patches at once if it already is). Installing routes nothing by itself: see ``should_route``.
- ``uninstall()``: idempotent. Restores every original function and class attribute (bitwise-identical results).
- ``attention_modules(root) -> list[(qualified_name, module)]``: the attention layers of this library inside
  ``root`` that the patcher routes; ``apply`` marks exactly these.
- ``unsupported() -> list[str]``: reasons the installed library version cannot be (fully) patched.

A wrapper routes a call into the dispatcher only when the attention layer carries a selection
(``MODULE_ATTR``, set by apply / set_attention_backend) or routing is process-wide (``state.route_all``, set by
``install(backend=...)`` and the startup hook); otherwise it calls the original code untouched.
"""

from __future__ import annotations

# Instance attribute on an attention layer: the selection string (e.g. "sage,native") from apply /
# set_attention_backend. A string, not a resolved chain, so deepcopy and pickling of the model keep working.
MODULE_ATTR = "_attnpatch_backend"
# Instance attribute on an attention layer: its qualified name for the report ("transformer.blocks.0.attn").
SITE_ATTR = "_attnpatch_site"


class state:  # noqa: N801 - a namespace of process-wide switches
    # True after install(backend=...) / the startup hook: every attention call is routed, marked or not.
    route_all: bool = False
