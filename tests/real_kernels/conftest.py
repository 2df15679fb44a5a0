"""tests/real_kernels: attnpatch against the real kernel libraries, run on CPU (docs/kernel-truth.md).

The SageAttention modules here (test_sage_*.py) need packages that the main suite does not install:
sageattention 1.0.x and triton, run by Triton's interpreter. Without them, each of their tests is skipped with
the reason, and the main suite stays quick. ``bash .ci/real_kernels.sh`` builds a venv with them and sets
``ATTNPATCH_REAL_KERNELS=1``: there a missing package is an error, never a skip, so that leg cannot pass by
testing nothing. The other modules here skip on their own libraries (``pytest.importorskip``); this file leaves
them alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SAGE_MODULES = "test_sage_*.py"
REQUIRED = "ATTNPATCH_REAL_KERNELS"  # set to 1 by .ci/real_kernels.sh


def sage_missing_reasons() -> list[str]:
    """Why SageAttention's Triton kernels cannot run here. Imports nothing: triton must not be imported here."""
    reasons = [f"{module} is not installed" for module in ("triton", "sageattention") if not _installed(module)]
    if not reasons:
        version = importlib.metadata.version("sageattention")
        if not version.startswith("1."):
            reasons.append(
                f"sageattention {version} is installed: these tests run the Triton-only 1.x release on CPU "
                "(2.x needs its CUDA extension)"
            )
    return reasons


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A session-wide hook: it sees the whole suite's items, so it touches only this directory's sage modules.
    sage_items = [item for item in items if item.path.parent == HERE and item.path.match(SAGE_MODULES)]
    reasons = sage_missing_reasons() if sage_items else []
    if not reasons:
        return
    message = "; ".join(reasons) + " (run `bash .ci/real_kernels.sh`, which installs sageattention==1.0.6 and triton)"
    if os.environ.get(REQUIRED) == "1":
        raise pytest.UsageError(f"{REQUIRED}=1 but SageAttention's real kernels cannot run: {message}")
    skip = pytest.mark.skip(reason=message)
    for item in sage_items:
        item.add_marker(skip)
