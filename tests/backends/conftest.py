"""Fixtures of the kernel-library backend tests (see kernel_setup.py for how a CPU test reaches a GPU adapter)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import fakes
import pytest
from kernel_setup import forget

from attnpatch.backends import hub
from attnpatch.core import selection
from attnpatch.testing import emulate_device


@pytest.fixture
def fake_libraries(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The fakes installed under the real module names, with fresh call logs."""
    fakes.reset()
    for name, module in fakes.MODULES.items():
        monkeypatch.setitem(sys.modules, name, module)
    forget()
    yield fakes
    forget()


@pytest.fixture
def pretend() -> Iterator[Any]:
    """pretend(device, capability, rocm): CPU tensors count as being on that device (attnpatch.testing)."""
    with ExitStack() as stack:

        def apply(device: str = "cuda", capability: tuple[int, int] = (9, 0), rocm: bool = False) -> None:
            stack.close()
            stack.enter_context(emulate_device(device, capability=capability, rocm=rocm))
            forget()

        yield apply


@pytest.fixture
def strict() -> Iterator[None]:
    selection.set_strict(True)
    yield
    selection.set_strict(False)


@pytest.fixture(autouse=True)
def _hub_state() -> Iterator[None]:
    # Trust and pins are process-wide: every test starts and ends without them.
    yield
    hub.reset()


@pytest.fixture
def trusted() -> None:
    hub.trust_hub_kernels(True)
