"""Shared test fixtures. Every test starts with attnpatch's process-wide selection state at its defaults."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dispatch_state():
    from attnpatch import dispatch

    saved = (dispatch._strict, dispatch._checks, dispatch._allow_lossy, dispatch._default, dispatch._auto_chooser)
    dispatch.reset_fallbacks()
    yield
    dispatch._strict, dispatch._checks, dispatch._allow_lossy, dispatch._default, dispatch._auto_chooser = saved
    dispatch._local.context = None
    dispatch._local.module = None
    dispatch._local.site = None
    dispatch._observers.clear()
    dispatch.reset_fallbacks()


@pytest.fixture
def seeded():
    torch.manual_seed(0)
