"""The .pth line is guarded: a broken attnpatch install costs one line on stderr, never site's traceback (twice)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PTH = Path(__file__).resolve().parents[1] / "sitecustomize" / "attnpatch-startup.pth"


def test_a_broken_install_prints_one_line_and_the_script_runs(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    (site_dir / "attnpatch").mkdir(parents=True)
    (site_dir / "attnpatch" / "__init__.py").write_text("raise ImportError('cannot import name _C (broken install)')\n")
    shutil.copy(PTH, site_dir)
    # -S: no site-packages at start (so no installed attnpatch and no other .pth); then only this site dir's.
    code = f"import site; site.addsitedir({str(site_dir)!r}); print('the script ran')"
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        capture_output=True,
        text=True,
        env={"ATTNPATCH_BACKEND": "flash", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout == "the script ran\n", result.stderr
    lines = result.stderr.splitlines()
    assert lines == [
        "attnpatch: not activated, its startup hook failed (ImportError: cannot import name _C (broken install)); "
        "running unpatched (reinstall attnpatch, or unset ATTNPATCH_BACKEND)"
    ], result.stderr


def test_the_line_does_nothing_without_the_variable(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    shutil.copy(PTH, site_dir)
    code = f"import site, sys; site.addsitedir({str(site_dir)!r}); print('attnpatch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, env={}, timeout=60
    )
    assert (result.stdout, result.stderr) == ("False\n", "")
