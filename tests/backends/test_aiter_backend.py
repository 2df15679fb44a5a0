"""Contract tests of AMD AITER: AMD's package told from PyPI's namesake, the result and the backward (fakes of the
library; see kernel_setup.py and tests/fakes/fake_aiter.py)."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from fakes import fake_aiter
from kernel_setup import assert_matches, calls_of, expected, forget, qkv

from attnpatch.backends import aiter
from attnpatch.core import dispatch, registry
from attnpatch.errors import AttnpatchWarning, UnsupportedCall

NOT_AMD = "the installed aiter is not AMD's AITER (PyPI's 'aiter' is an unrelated async-iterator library)"


def _pypi_aiter() -> types.ModuleType:
    """What `pip install aiter` imports: aiter 0.13.20191203, async-iterator helpers (its __init__.py __all__)."""
    module = types.ModuleType("aiter", "Useful patterns building upon asynchronous iterators")
    module.__spec__ = importlib.machinery.ModuleSpec("aiter", None, origin="site-packages/aiter/__init__.py")
    module.__version__ = "0.13.20191203"  # type: ignore[attr-defined]
    for name in ("active_aiter", "azip", "flatten_aiter", "join_aiters", "map_aiter", "push_aiter"):
        setattr(module, name, lambda *args: None)
    return module


def test_pypi_aiter_is_not_amd_aiter(pretend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old `[aiter]` extra installed PyPI's aiter: reported available, then AttributeError on flash_attn_func."""
    monkeypatch.setitem(sys.modules, "aiter", _pypi_aiter())
    pretend("cuda", (9, 4), rocm=True)
    backend = registry.get_backend("aiter")
    assert not backend.available and backend.reasons[0].startswith(NOT_AMD)
    assert "pip uninstall aiter && pip install 'amd-aiter>=0.1.5.dev0'" in backend.reasons[0]
    q, k, v = qkv()
    with pytest.warns(AttnpatchWarning, match="is not AMD's AITER"):
        out = dispatch.dispatch_attention(q, k, v, backend="aiter,native")
    assert_matches(out, expected(q, k, v))


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("amd", [False, True], ids=["pypi_aiter", "amd_aiter"])
def test_installed_aiter_is_judged_without_importing(
    amd: bool, tmp_path: Path, pretend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not imported yet: AMD's package is the one with aiter/ops/mha.py (where flash_attn_func is defined)."""
    files = {"aiter/__init__.py": "raise AssertionError('availability must not import aiter')\n"}
    files.update({"aiter/ops/__init__.py": "", "aiter/ops/mha.py": ""} if amd else {"aiter/map_aiter.py": ""})
    monkeypatch.syspath_prepend(str(_package(tmp_path, files)))
    monkeypatch.delitem(sys.modules, "aiter", raising=False)
    pretend("cuda", (9, 4), rocm=True)
    assert aiter.is_amd_aiter() is amd
    assert registry.get_backend("aiter").available is amd
    assert "aiter" not in sys.modules


def test_aiter_pypi_files_over_amd_ones_are_caught_at_import(
    tmp_path: Path, pretend: Any, strict: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyPI's aiter installed over AMD's leaves ops/mha.py behind: the imported module is checked again."""
    files = {
        "aiter/__init__.py": "__version__ = '0.13.20191203'\n",
        "aiter/ops/__init__.py": "",
        "aiter/ops/mha.py": "",
    }
    monkeypatch.syspath_prepend(str(_package(tmp_path, files)))
    monkeypatch.delitem(sys.modules, "aiter", raising=False)
    pretend("cuda", (9, 4), rocm=True)
    assert registry.get_backend("aiter").available
    q, k, v = qkv()
    try:
        with pytest.raises(UnsupportedCall, match="is not AMD's AITER"):
            dispatch.dispatch_attention(q, k, v, backend="aiter")
    finally:
        sys.modules.pop("aiter", None)  # imported from tmp_path by the check


def test_aiter_returns_a_tensor_and_asks_for_lse_only_for_a_backward(
    fake_libraries: Any, pretend: Any, strict: None
) -> None:
    """amd-aiter's flash_attn_func returns out alone, and asserts return_lse when a backward will follow."""
    pretend("cuda", (9, 4), rocm=True)
    q, k, v = qkv(heads_kv=2)
    assert isinstance(fake_aiter.flash_attn_func(q, k, v), torch.Tensor), "the fake mirrors the real result"
    fake_aiter.calls.clear()
    assert_matches(dispatch.dispatch_attention(q, k, v, backend="aiter"), expected(q, k, v))
    assert calls_of(fake_aiter, "flash_attn_func")[-1]["return_lse"] is False
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with pytest.raises(AssertionError):
        fake_aiter.flash_attn_func(q, k, v)  # the trap: the real forward asserts return_lse with grads
    out = dispatch.dispatch_attention(q, k, v, is_causal=True, backend="aiter")
    assert calls_of(fake_aiter, "flash_attn_func")[-1]["return_lse"] is True
    out.float().sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    forget()
