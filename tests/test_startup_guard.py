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


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    variables = {k: v for k, v in os.environ.items() if not k.startswith("ATTNPATCH_")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**variables, **env}, timeout=120
    )


def test_probing_an_absent_library_imports_nothing() -> None:
    # ATTNPATCH_BACKEND set, diffusers absent (site-packages off sys.path): a find_spec probe must not activate
    # attnpatch (before: ~1.8 s and an import of torch for a library that is not there).
    code = (
        "import sys, importlib.util\n"
        "sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
        "print(importlib.util.find_spec('diffusers') is None, 'torch' in sys.modules, 'attnpatch.api' in sys.modules)\n"
    )
    result = _run(code, ATTNPATCH_BACKEND="native")
    assert (result.stdout, result.stderr) == ("True False False\n", "")


def test_a_huge_bad_value_is_shortened_in_its_one_line() -> None:
    result = _run("import transformers", ATTNPATCH_BACKEND="x" * 100_000)
    assert result.returncode == 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 2000, f"{len(result.stderr)} characters on stderr"
    assert "(100000 characters)" in lines[0]


def test_an_exception_in_a_post_import_hook_never_breaks_the_import(tmp_path: Path) -> None:
    # A patcher whose hook raises when its library is imported: the import succeeds, unpatched, with one warning.
    (tmp_path / "some_library.py").write_text("VALUE = 42\n")
    code = (
        f"import sys, warnings; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from attnpatch.patchers._base import Patcher\n"
        "class Broken(Patcher):\n"
        "    library = 'some_library'\n"
        "    def _install(self):\n"
        "        def hook(module): raise RuntimeError('a library version this patcher does not know')\n"
        "        self.when_imported('some_library', hook)\n"
        "Broken().install()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import some_library\n"
        "print(some_library.VALUE, len(caught), 'patching some_library failed' in str(caught[0].message))\n"
    )
    result = _run(code)
    assert result.stdout == "42 1 True\n", result.stderr


def test_fork_while_another_thread_is_inside_apply_does_not_deadlock_the_child() -> None:
    # Before: 6 of 10 children hung on a lock held by a thread that does not exist in the child.
    code = (
        "import os, sys, threading, time\n"
        "import attnpatch\n"
        "from attnpatch import api\n"
        "held, done = threading.Event(), threading.Event()\n"
        "def inside_apply():\n"
        "    with api._lock:\n"
        "        held.set(); done.wait(30)\n"
        "threading.Thread(target=inside_apply, daemon=True).start(); held.wait()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    attnpatch.uninstall(); os._exit(0)\n"
        "for _ in range(200):\n"
        "    finished, status = os.waitpid(pid, os.WNOHANG)\n"
        "    if finished: break\n"
        "    time.sleep(0.05)\n"
        "else:\n"
        "    os.kill(pid, 9); print('child hung'); sys.exit(1)\n"
        "done.set(); print('child exited', os.waitstatus_to_exitcode(status))\n"
    )
    result = _run(code)
    assert result.stdout == "child exited 0\n", result.stdout + result.stderr
