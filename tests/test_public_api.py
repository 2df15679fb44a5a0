"""The public surface: a small explicit __all__, and `import attnpatch` staying free of heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys

import attnpatch

EXPECTED_PUBLIC = {
    "AttnpatchError",
    "AttnpatchWarning",
    "BackendUnavailable",
    "Capabilities",
    "CheckFailed",
    "UnknownBackendError",
    "UnsupportedCall",
    "__version__",
    "apply",
    "install",
    "reset_attention_backend",
    "set_attention_backend",
    "unapply",
    "uninstall",
    "attention_backend",
    "current_backend",
    "dispatch_attention",
    "fallback_counts",
    "get_backend",
    "get_default_backend",
    "list_backends",
    "register_backend",
    "set_allow_lossy",
    "set_checks",
    "set_default_backend",
    "set_strict",
    "unregister_backend",
}


def test_all_is_sorted_explicit_and_resolvable() -> None:
    assert attnpatch.__all__ == sorted(attnpatch.__all__)
    assert set(attnpatch.__all__) >= EXPECTED_PUBLIC
    for name in attnpatch.__all__:
        assert getattr(attnpatch, name) is not None, name


def test_import_attnpatch_imports_neither_torch_nor_wrapt() -> None:
    code = (
        "import sys, attnpatch, json; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'wrapt', 'diffusers', 'transformers', 'numpy'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_list_command_shows_every_backend_with_availability() -> None:
    proc = subprocess.run([sys.executable, "-m", "attnpatch", "list", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert {b.name for b in attnpatch.list_backends()} == set(rows)
    assert rows["native"]["available"] is True  # JSON true/false, not "yes"/"no" strings
    assert rows["_native_cudnn"]["available"] is False
    assert rows["native"]["gqa"] is True and rows["native"]["lossy"] is False
    shown = subprocess.run(
        [sys.executable, "-m", "attnpatch", "list", "--available"], capture_output=True, text=True
    ).stdout
    assert "native" in shown and "_native_cudnn" not in shown and "not available here" not in shown
    assert any("CUDA" in r for r in rows["_native_cudnn"]["reasons"])
    table = subprocess.run([sys.executable, "-m", "attnpatch", "list"], capture_output=True, text=True, check=True)
    assert "not available here:" in table.stdout and "_native_cudnn:" in table.stdout
