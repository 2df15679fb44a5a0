"""Interpreter-start activation: the .pth line, sitecustomize, ATTNPATCH_* at startup, and child interpreters."""

from __future__ import annotations

import os
import shutil
import site
import sys
import zipfile
from pathlib import Path

import pytest
from scripts.processes import ROOT, SCRIPTS, attnpatch_lines, python, unpatched_probe

from attnpatch import api, startup
from attnpatch.startup import Settings

PROBE = str(SCRIPTS / "probe.py")
SITECUSTOMIZE = ROOT / "sitecustomize"
PTH = "attnpatch-startup.pth"


# --- in this process: when activation happens, and what goes wrong --------------------------------------------


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """startup's state reset (and restored after), trigger modules of our own, and api.install recorded."""
    for name, value in (("_ran", False), ("_pending", None), ("_active", None), ("_hook", None)):
        monkeypatch.setattr(startup, name, value)
    monkeypatch.setattr(startup, "BEFORE", frozenset({"attnpatch_test_lib"}))
    monkeypatch.setattr(startup, "AFTER", "attnpatch_test_after")
    for name in ("attnpatch_test_lib", "attnpatch_test_after"):
        # Each records whether attnpatch was active when its first line ran.
        (tmp_path / f"{name}.py").write_text("import attnpatch.startup as s\nACTIVE_AT_IMPORT = s.active()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(api, "install", lambda backend, strict, checks: calls.append((backend, strict, checks)))
    monkeypatch.setattr(api, "uninstall", lambda: calls.append(("uninstall",)))
    monkeypatch.delenv("ATTNPATCH_BACKEND", raising=False)
    monkeypatch.setenv(startup.REPORT_PARENT, "")  # activating a report sets it: put back what was there after
    yield calls
    sys.meta_path[:] = [f for f in sys.meta_path if not startup.is_own_finder(f)]
    for name in ("attnpatch_test_lib", "attnpatch_test_after"):
        sys.modules.pop(name, None)


def _hooks() -> int:
    return sum(startup.is_own_finder(f) for f in sys.meta_path)


def test_unset_does_nothing_and_run_is_idempotent(fresh, monkeypatch) -> None:
    startup.run()
    assert (_hooks(), startup.pending()) == (0, None)
    monkeypatch.setattr(startup, "_ran", False)
    monkeypatch.setenv("ATTNPATCH_BACKEND", "native")
    startup.run()
    startup.run()  # a .pth seen twice, or the .pth and sitecustomize
    assert (_hooks(), startup.pending()) == (1, Settings("native"))


def test_disable_wins(fresh, monkeypatch) -> None:
    monkeypatch.setenv("ATTNPATCH_BACKEND", "native")
    monkeypatch.setenv("ATTNPATCH_DISABLE", "1")
    startup.run()
    assert (_hooks(), startup.pending(), fresh) == (0, None, [])


def test_activates_before_the_library_runs_its_first_line(fresh) -> None:
    settings = Settings("native", checks=True)
    assert startup.activate(settings) is None
    assert fresh == [] and _hooks() == 1  # waiting: nothing imported, nothing installed
    import attnpatch_test_lib  # type: ignore[import-not-found]

    assert settings == attnpatch_test_lib.ACTIVE_AT_IMPORT
    assert fresh == [("native", None, True)]
    assert _hooks() == 0  # the hook removes itself


def test_activates_after_attnpatch_dispatch_ran(fresh) -> None:
    settings = Settings("native")
    startup.activate(settings)
    import attnpatch_test_after  # type: ignore[import-not-found]

    assert attnpatch_test_after.ACTIVE_AT_IMPORT is None
    assert startup.active() == settings
    assert type(attnpatch_test_after.__loader__).__name__ == "SourceFileLoader"  # our proxy is gone again


def test_finders_added_while_activating_see_that_very_import(fresh, monkeypatch) -> None:
    # The patchers register wrapt post-import hooks while activating, and wrapt's finder goes to
    # sys.meta_path[0] at the first registration: the import that triggered activation must pass through it.
    asked: list[str] = []

    class Finder:
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            asked.append(name)

    monkeypatch.setattr(api, "install", lambda *a, **k: sys.meta_path.insert(0, Finder()))
    startup.activate(Settings("native"))
    try:
        import attnpatch_test_lib  # type: ignore[import-not-found]  # noqa: F401
    finally:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, Finder)]
    assert "attnpatch_test_lib" in asked


def test_unknown_backend_is_reported_at_the_first_import(fresh, capsys) -> None:
    assert startup.activate(Settings("falsh")) is None
    assert capsys.readouterr().err == ""  # the name is checked when torch is imported anyway
    import attnpatch_test_lib  # type: ignore[import-not-found]  # noqa: F401

    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("attnpatch: ATTNPATCH_BACKEND='falsh': unknown attention backend 'falsh'")
    assert "valid names:" in line and line.endswith("running unpatched (ATTNPATCH_STRICT=1 makes this an error)")
    assert (fresh, startup.active()) == ([], None)


def test_strict_checks_and_installs_at_once(fresh) -> None:
    problem = startup.activate(Settings("falsh", strict=True))
    assert problem is not None and problem.startswith("ATTNPATCH_BACKEND='falsh': unknown attention backend")
    assert (fresh, _hooks()) == ([], 0)
    assert startup.activate(Settings("native", strict=True)) is None
    assert fresh == [("native", True, None)]


def test_internal_errors_are_one_line_and_leave_nothing_installed(fresh, monkeypatch, capsys) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        fresh.append(("install",))
        raise RuntimeError("half-way")

    monkeypatch.setattr(api, "install", broken)
    assert startup.activate(Settings("native", strict=True)) is None
    assert fresh == [("install",), ("uninstall",)]
    assert startup.active() is None
    assert capsys.readouterr().err == (
        "attnpatch: could not activate backend 'native' (RuntimeError: half-way); running unpatched\n"
    )

    monkeypatch.setenv("ATTNPATCH_BACKEND", "native")
    monkeypatch.setattr(Settings, "from_env", lambda: 1 / 0)
    startup.run()
    expected = "attnpatch: startup failed (ZeroDivisionError: division by zero); running unpatched\n"
    assert capsys.readouterr().err == expected


def test_a_feature_that_fails_is_one_line_and_the_rest_stays_active(fresh, monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(
        startup, "_FEATURES", (*startup._FEATURES, ("autotune", "attnpatch.no_such_feature", lambda m, s: None))
    )
    missing = str(tmp_path / "no" / "such" / "folder" / "r.json")
    settings = Settings("native", strict=True, report=missing, autotune=True, from_cli=frozenset({"autotune"}))
    monkeypatch.setattr("attnpatch.autotune.enable", lambda: fresh.append(("autotune",)))
    startup.activate(settings)
    assert startup.active() == settings
    assert fresh == [("native", True, None), ("autotune",)]
    report, feature = capsys.readouterr().err.splitlines()
    assert report.startswith(f"attnpatch: ATTNPATCH_REPORT='{missing}': cannot write the report")
    assert report.endswith("ATTNPATCH_REPORT is ignored")
    assert feature == (
        "attnpatch: --autotune is set, but this attnpatch has no attnpatch.no_such_feature; --autotune is ignored"
    )


# --- interpreters started with ATTNPATCH_* set ----------------------------------------------------------------

SHOW_STATE = (
    "import sys; import os; "
    "hooks = sum(type(f).__name__ == '_ImportHook' for f in sys.meta_path); "
    "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('attnpatch', 'torch', 'wrapt')); "
    "ours = (getattr(sys.modules.get('sitecustomize'), '__file__', None) or '').startswith("
    f"{str(SITECUSTOMIZE)!r}); "
    "print(hooks, loaded, ours)"
)


def test_the_pth_line_is_installed_here() -> None:
    found = [Path(d) / PTH for d in site.getsitepackages() if (Path(d) / PTH).exists()]
    assert found, f"{PTH} is not in {site.getsitepackages()}: reinstall attnpatch (pip install -e .)"
    assert found[0].read_text() == (SITECUSTOMIZE / PTH).read_text()


def test_unset_imports_nothing() -> None:
    result = python("-c", SHOW_STATE)
    assert result.stdout == "0 [] False\n"


def test_set_waits_without_torch_or_wrapt_and_activates_once() -> None:
    # The .pth line runs twice here (lib64 -> lib in a venv) and sitecustomize once more: one hook.
    result = python("-c", SHOW_STATE, env={"ATTNPATCH_BACKEND": "flash", "PYTHONPATH": str(SITECUSTOMIZE)})
    assert result.stdout == "1 ['attnpatch', 'attnpatch.env', 'attnpatch.startup'] True\n"
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("-E", "1 True False"),  # PYTHONPATH ignored, so no sitecustomize; the .pth line still runs
        ("-I", "1 True False"),  # the same (isolated mode implies -E)
        ("-S", "0 False False"),  # no site: neither the .pth line nor sitecustomize (PYTHONPATH is on sys.path)
        ("-s", "1 True True"),  # no user site: nothing changes
    ],
)
def test_interpreter_flags(flag: str, expected: str) -> None:
    code = SHOW_STATE.replace("print(hooks, loaded,", "print(hooks, 'attnpatch.startup' in loaded,")
    result = python(flag, "-c", code, env={"ATTNPATCH_BACKEND": "flash", "PYTHONPATH": str(SITECUSTOMIZE)})
    assert result.stdout.strip() == expected, result.stderr


def test_sitecustomize_runs_the_one_it_shadows_once(tmp_path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("print('the shadowed sitecustomize ran')\n")
    copy = tmp_path / "copy"
    shutil.copytree(SITECUSTOMIZE, copy)  # two copies of ours on the path must not run each other forever
    path = os.pathsep.join([str(SITECUSTOMIZE), str(copy), str(other)])
    code = "import sys; print(sys.modules['sitecustomize'].__file__)"
    for variables in ({"PYTHONPATH": path}, {"PYTHONPATH": path, "ATTNPATCH_BACKEND": "flash"}):
        result = python("-c", code, env=variables)
        assert result.stdout == f"the shadowed sitecustomize ran\n{other / 'sitecustomize.py'}\n", result.stderr


def test_importing_the_dispatcher_activates_it() -> None:
    code = (
        "import attnpatch.core.dispatch as d; from attnpatch.core import selection; "
        "print(selection.get_default_backend(), type(d.__loader__).__name__)"
    )
    result = python("-c", code, env={"ATTNPATCH_BACKEND": "_native_math"})
    assert (result.stdout, result.stderr) == ("_native_math SourceFileLoader\n", "")


def test_transformers_is_routed_and_a_bad_feature_value_is_one_line(tmp_path) -> None:
    variables = {"ATTNPATCH_BACKEND": "_native_math", "ATTNPATCH_REPORT": str(tmp_path / "no" / "r.json")}
    result = python(PROBE, "transformers", env={**variables, "ATTNPATCH_VERIFY": "often"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("routed=2 served=_native_math")
    report, verify = attnpatch_lines(result.stderr)
    assert report.startswith("attnpatch: ATTNPATCH_REPORT=") and report.endswith("ATTNPATCH_REPORT is ignored")
    assert verify.startswith("attnpatch: ATTNPATCH_VERIFY='often': verify interval 'often' is not a positive")


def test_unknown_backend_is_one_line_and_an_unpatched_run() -> None:
    result = python(PROBE, env={"ATTNPATCH_BACKEND": "falsh"})
    assert (result.returncode, result.stdout) == (0, unpatched_probe())
    [line] = attnpatch_lines(result.stderr)
    assert line.startswith("attnpatch: ATTNPATCH_BACKEND='falsh': unknown attention backend 'falsh'")
    assert "valid names:" in line


def test_unknown_backend_under_strict_exits_2_before_the_script() -> None:
    result = python("-c", "print('the script started')", env={"ATTNPATCH_BACKEND": "falsh", "ATTNPATCH_STRICT": "1"})
    assert (result.returncode, result.stdout) == (2, "")
    [line] = result.stderr.splitlines()
    assert line.startswith("attnpatch: ATTNPATCH_BACKEND='falsh': unknown attention backend 'falsh'")
    assert line.endswith("exiting with status 2 because ATTNPATCH_STRICT is set")


def test_backend_that_cannot_run_here_falls_back_to_the_unpatched_result_or_fails_under_strict() -> None:
    result = python(PROBE, env={"ATTNPATCH_BACKEND": "_native_cudnn"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == unpatched_probe().replace("routed=0 served=-", "routed=1 served=native")
    assert "backend '_native_cudnn' cannot serve this call" in result.stderr

    result = python(PROBE, env={"ATTNPATCH_BACKEND": "_native_cudnn", "ATTNPATCH_STRICT": "1"})
    assert (result.returncode, result.stdout) == (1, "")
    assert "UnsupportedCall: no backend of '_native_cudnn' can serve this attention call" in result.stderr


def test_startup_errors_never_crash_python(tmp_path) -> None:
    (tmp_path / "torch.py").write_text("raise RuntimeError('this torch is broken')\n")
    variables = {"ATTNPATCH_BACKEND": "native", "ATTNPATCH_STRICT": "1", "PYTHONPATH": str(tmp_path)}
    result = python("-c", "print('the script ran')", env=variables)
    assert (result.returncode, result.stdout) == (0, "the script ran\n")
    [line] = result.stderr.splitlines()
    assert line.startswith("attnpatch: ") and "RuntimeError: this torch is broken" in line
    assert line.endswith("running unpatched")


@pytest.mark.slow
def test_torchrun_ranks_are_routed() -> None:
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPTS / "torchrun_probe.py")]
    result = python(*args, env={"ATTNPATCH_BACKEND": "_native_math", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["rank 0", "rank 1"]
    assert all(": routed=1 served=_native_math" in line for line in lines), lines


# --- packaging ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_wheel_carries_the_pth_line_and_sitecustomize(tmp_path) -> None:
    source = tmp_path / "src"
    shutil.copytree(ROOT / "attnpatch", source / "attnpatch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(SITECUSTOMIZE, source / "sitecustomize", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, source / name)
    result = python("-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(source))
    assert result.returncode == 0, result.stderr
    [wheel] = (tmp_path / "dist").glob("attnpatch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(PTH) == (SITECUSTOMIZE / PTH).read_bytes()
        assert (
            archive.read("attnpatch/_sitecustomize/sitecustomize.py")
            == (SITECUSTOMIZE / "sitecustomize.py").read_bytes()
        )
