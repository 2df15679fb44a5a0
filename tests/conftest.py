"""Shared test fixtures. Every test starts with attnpatch's process-wide selection state at its defaults."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dispatch_state():
    from attnpatch.core import dispatch, hooks, registry, selection

    registered = {backend.name for backend in registry.list_backends()}
    saved = selection.snapshot()
    saved_hooks = hooks.snapshot()
    dispatch.reset_fallbacks()
    yield
    # A test that opened an attention_backend() block (which installs the patchers and leaves them for the next
    # unapply/uninstall) or install()ed must not leave patchers behind for the next test.
    import sys

    api = sys.modules.get("attnpatch.api")
    if api is not None:
        api.uninstall()
    selection.restore(saved)
    hooks.restore(saved_hooks)
    hooks.clear_observers()
    hooks.clear_site_overrides()
    dispatch.reset_fallbacks()
    # A backend a test registered and did not unregister would change what the next test lists or picks.
    leaked = {backend.name for backend in registry.list_backends()} - registered
    for name in leaked:
        registry.unregister_backend(name)
    assert not leaked, f"the test left backends registered: {sorted(leaked)} (unregister them in the test)"


@pytest.fixture
def seeded():
    torch.manual_seed(0)
