"""The routing engine: the call, capabilities, registry, masks, selection, the router, its hooks and checks.

Import rule: core imports nothing from attnpatch but ``errors`` and ``env`` (and loads the built-in backends by
name, as plugins, in :func:`attnpatch.core.registry.load_builtins`). Backends and patchers import core; tools
use its public functions. docs/architecture.md has the full picture; tests/test_architecture.py enforces it.
"""
