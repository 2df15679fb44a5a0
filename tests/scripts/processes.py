"""Helpers for the process tests (tests/test_runner.py, tests/test_startup.py); not a user script."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "scripts"


def python(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | str = ROOT,
    stdin: str | None = None,
    executable: str = sys.executable,
    timeout: float = 300,
    merge: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``executable *args`` with no ATTNPATCH_* variable and no PYTHONPATH but those in ``env``.

    merge: stderr goes into stdout, in the order it was written (as in a log of ``2>&1``).
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ATTNPATCH_") and k != "PYTHONPATH"}
    clean.update(env or {})
    return subprocess.run(
        [executable, *args],
        env=clean,
        cwd=cwd,
        input=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge else subprocess.PIPE,
        text=True,
        timeout=timeout,
    )


def attnpatch_lines(stderr: str) -> list[str]:
    """The lines attnpatch itself wrote (``attnpatch: ...``)."""
    return [line for line in stderr.splitlines() if line.startswith("attnpatch: ")]


@functools.cache
def unpatched_probe() -> str:
    """probe.py's line under plain python (once per test session): nothing routed, the library's own result."""
    result = python(str(SCRIPTS / "probe.py"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("routed=0 served=- out=")
    return result.stdout
