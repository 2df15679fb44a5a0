"""Shared test fixtures. Every test starts with attnpatch's process-wide selection state at its defaults."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dispatch_state():
    from attnpatch.core import dispatch, hooks, selection

    saved = selection.snapshot()
    saved_hooks = hooks.snapshot()
    dispatch.reset_fallbacks()
    yield
    selection.restore(saved)
    hooks.restore(saved_hooks)
    hooks.clear_observers()
    hooks.clear_site_overrides()
    dispatch.reset_fallbacks()


@pytest.fixture
def seeded():
    torch.manual_seed(0)
