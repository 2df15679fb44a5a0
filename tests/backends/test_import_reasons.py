"""An installed kernel package that fails to import: the reason shows the library's own message and the fix for
that cause (not "reinstall it for torch X" for everything). Messages as the libraries and the loader raise them
(docs/kernel-facts.md)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

import pytest
import torch

from attnpatch.backends import _probe
from attnpatch.core.call import CallSpec

RELEASE = torch.__version__


class _Failing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``module`` is found (its parents as empty packages), and executing it raises ``exc``: a broken build, as the
    import system sees one."""

    def __init__(self, module: str, exc: BaseException) -> None:
        self.module, self.exc = module, exc

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name == self.module or self.module.startswith(name + "."):
            return importlib.machinery.ModuleSpec(name, self, is_package=name != self.module)
        return None

    def exec_module(self, module: Any) -> None:
        if module.__name__ == self.module:
            raise self.exc


def _reasons(module: str, exc: BaseException, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(sys, "meta_path", [_Failing(module, exc), *sys.meta_path])
    names = module.split(".")
    parents = [".".join(names[: i + 1]) for i in range(len(names))]
    for name in parents:
        monkeypatch.delitem(sys.modules, name, raising=False)
    call = CallSpec("cuda", 0, torch.float16, 64, 64, 4, 4, 12, 12, "none", False, False, False, False, False)
    try:
        return _probe.import_reasons(module, call)
    finally:
        for name in parents:  # the empty parent packages must not outlive the test
            sys.modules.pop(name, None)


def _missing(name: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"No module named '{name}'", name=name)


CASES = {
    "another_torch": (
        "flash_attn",
        ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c105ErrorC2ENS_14SourceLocationENSt7__cxx1112basic"),
        f"flash_attn failed to import (ImportError: flash_attn_2_cuda.so: undefined symbol: _ZN3c105ErrorC2ENS_14Sour"
        f"ceLocationENSt7__cxx1112basic): built for another torch: reinstall it for torch {RELEASE}",
    ),
    "xformers_flash_range": (
        "xformers.ops",
        ImportError("Requires Flash-Attention version >=2.7.1,<=2.8.4 but got 2.6.3."),
        "xformers.ops failed to import (ImportError: Requires Flash-Attention version >=2.7.1,<=2.8.4 but got 2.6.3.)"
        ": xformers refuses the installed flash-attn 2.6.3; set XFORMERS_IGNORE_FLASH_VERSION_CHECK=1, or pip "
        "install 'flash-attn>=2.7.1,<=2.8.4' --no-build-isolation",
    ),
    "flash_without_extension": (
        "xformers.ops",
        _missing("flash_attn_2_cuda"),
        "xformers.ops failed to import (ModuleNotFoundError: No module named 'flash_attn_2_cuda'): flash-attn is "
        f"installed without its CUDA extension: reinstall it for torch {RELEASE} (pip install flash-attn "
        "--no-build-isolation), or pip uninstall flash-attn",
    ),
    "missing_cuda_library": (
        "xformers.ops",
        ImportError("libcudart.so.12: cannot open shared object file: No such file or directory"),
        "xformers.ops failed to import (ImportError: libcudart.so.12: cannot open shared object file: No such file or "
        "directory): the CUDA library libcudart.so.12 is not found: this build needs a CUDA runtime that torch",
    ),
    "missing_dependency": (
        "flash_attn.cute",
        _missing("cutlass"),
        "flash_attn.cute failed to import (ModuleNotFoundError: No module named 'cutlass'): its dependency cutlass is "
        "missing: reinstall flash_attn with its dependencies",
    ),
    "anything_else": (
        "sageattention",
        RuntimeError("CUDA error: no kernel image is available for execution on the device"),
        "sageattention failed to import (RuntimeError: CUDA error: no kernel image is available for execution on the "
        "device)",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_import_failure_names_the_cause(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module, exc, reason = CASES[case]
    (found,) = _reasons(module, exc, monkeypatch)
    assert found.startswith(reason), found
    assert ("built for another torch" in found) == (case == "another_torch")
    if case == "anything_else":
        assert found == reason, "no guessed fix for a cause it does not know"


def test_torch_xla_without_custom_kernel_is_a_version_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch_xla 2.2 has no experimental/custom_kernel.py: the import fails with that module's name."""
    torch_xla = types.ModuleType("torch_xla")
    torch_xla.__version__ = "2.2.0"  # type: ignore[attr-defined]
    experimental = types.ModuleType("torch_xla.experimental")
    experimental.__path__ = []  # a package without the submodule
    monkeypatch.setitem(sys.modules, "torch_xla", torch_xla)
    monkeypatch.setitem(sys.modules, "torch_xla.experimental", experimental)
    monkeypatch.delitem(sys.modules, "torch_xla.experimental.custom_kernel", raising=False)
    call = CallSpec("xla", 0, torch.float32, 64, 64, 4, 4, 12, 12, "none", False, False, False, False, False)
    (found,) = _probe.import_reasons("torch_xla.experimental.custom_kernel", call)
    release = RELEASE.split("+")[0]
    assert found.startswith("torch_xla.experimental.custom_kernel failed to import (ModuleNotFoundError: ")
    assert "torch_xla 2.2.0 has no experimental/custom_kernel.py" in found and "torch_xla >= 2.4 is needed" in found
    assert found.endswith(f"pip install 'torch=={release}' 'torch-xla[tpu]=={release}'")
