"""The runner: which arguments are attnpatch's, running a script exactly as python does, routing in-process and
in the interpreters the script starts."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest
from scripts.processes import ROOT, SCRIPTS, attnpatch_lines, python, unpatched_probe

from attnpatch import env
from attnpatch.cli import run as runner
from attnpatch.cli.run import UsageError, parse

SHOW = str(SCRIPTS / "show.py")
PROBE = str(SCRIPTS / "probe.py")


# --- which arguments are attnpatch's --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "backend", "target", "args"),
    [
        (["s.py", "a", "--backend", "flash", "b"], "flash", "s.py", ["a", "b"]),
        (["s.py", "--backend=flash"], "flash", "s.py", []),
        (["--backend", "sage", "s.py", "--backend", "flash"], "sage", "s.py", ["--backend", "flash"]),
        (["--backend=sage", "s.py", "--backend=flash"], "sage", "s.py", ["--backend=flash"]),
        (["s.py", "--backend", "a", "--backend", "b"], "a", "s.py", ["--backend", "b"]),
        (["s.py", "x", "--", "--backend", "flash"], None, "s.py", ["x", "--", "--backend", "flash"]),
        (["--", "s.py", "--backend", "flash"], None, "s.py", ["--backend", "flash"]),
        (["--", "-odd-name.py", "x"], None, "-odd-name.py", ["x"]),
        (
            ["s.py", "--strict", "--report", "--verify=3", "-m", "x"],
            None,
            "s.py",
            ["--strict", "--report", "--verify=3", "-m", "x"],
        ),
        (["-", "a"], None, "-", ["a"]),
    ],
)
def test_options_before_the_script_are_attnpatchs_after_it_only_backend(argv, backend, target, args) -> None:
    opts = parse(argv)
    assert (opts.backend, opts.target, opts.args, opts.module) == (backend, target, args, False)


def test_every_option() -> None:
    opts = parse(
        ["--strict", "--checks", "--report=out.json", "--verify=10", "--verify-action", "raise", "--autotune",
         "--backend", "auto", "s.py", "--strict"]
    )  # fmt: skip
    assert (opts.strict, opts.checks, opts.report, opts.verify, opts.verify_action, opts.autotune) == (
        True, True, "out.json", "10", "raise", True
    )  # fmt: skip
    assert opts.args == ["--strict"]
    assert opts.given == {"strict", "checks", "report", "verify", "verify_action", "autotune", "backend"}
    # A bare --report / --verify never takes the next argument: that is the script.
    opts = parse(["--report", "--verify", "s.py"])
    assert (opts.report, opts.verify, opts.target) == ("1", "1", "s.py")


@pytest.mark.parametrize(
    ("argv", "target", "backend", "args"),
    [
        (["-m", "pkg.mod", "--backend", "x", "y"], "pkg.mod", "x", ["y"]),
        (["-mpkg.mod", "a"], "pkg.mod", None, ["a"]),
        (["--backend", "flash", "-m", "pkg", "--backend", "x"], "pkg", "flash", ["--backend", "x"]),
    ],
)
def test_module(argv, target, backend, args) -> None:
    opts = parse(argv)
    assert (opts.module, opts.target, opts.backend, opts.args) == (True, target, backend, args)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus", "s.py"], "unknown option '--bogus'"),
        (["--backend"], "--backend needs a value"),
        (["--backend", " ", "s.py"], "--backend needs a non-empty value"),
        (["s.py", "--backend"], "--backend needs a value"),
        (["--strict=1", "s.py"], "--strict takes no value"),
        (["--report=", "s.py"], "--report= needs a value"),
        (["--"], "'--' must be followed by the script"),
        (["-m"], "-m needs a module name"),
    ],
)
def test_bad_command_lines(argv, message, capsys) -> None:
    with pytest.raises(UsageError, match=message):
        parse(argv)
    assert runner.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m attnpatch") and f"error: {message}" in err


def test_no_script(capsys) -> None:
    assert runner.main(["--strict"]) == 2
    assert "error: no script to run" in capsys.readouterr().err


def test_missing_script_is_status_2_like_python(tmp_path) -> None:
    result = python("-m", "attnpatch", "--backend", "native", "missing.py", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", "No file to run: 'missing.py'\n")


def test_disable_wins_over_the_command_line() -> None:
    result = python("-m", "attnpatch", "--backend", "native", SHOW, "stdin", env={"ATTNPATCH_DISABLE": "1"})
    assert result.returncode == 0
    assert "stdin \n" in result.stdout
    assert result.stderr == f"attnpatch: ATTNPATCH_DISABLE is set: running {SHOW} unpatched\n"


def test_options_win_over_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("ATTNPATCH_BACKEND", "sage")
    monkeypatch.setenv("ATTNPATCH_REPORT", "1")
    monkeypatch.setenv("ATTNPATCH_VERIFY", "0")
    settings = parse(["--backend", "flash", "--checks", "s.py"]).settings()
    assert settings is not None
    assert (settings.backend, settings.checks, settings.report, settings.verify) == ("flash", True, "1", None)
    assert (settings.label("backend"), settings.label("report")) == ("--backend", "ATTNPATCH_REPORT")
    assert settings.environ()["ATTNPATCH_BACKEND"] == "flash"
    monkeypatch.setenv("ATTNPATCH_DISABLE", "1")
    assert parse(["--backend", "flash", "s.py"]).settings() is None


def test_default_backend_is_native_or_auto_with_autotune(monkeypatch) -> None:
    monkeypatch.delenv("ATTNPATCH_BACKEND", raising=False)
    assert parse(["s.py"]).settings().backend == "native"  # type: ignore[union-attr]
    assert parse(["--autotune", "s.py"]).settings().backend == "auto"  # type: ignore[union-attr]


def test_help_documents_the_rule_every_option_and_every_variable(capsys) -> None:
    assert runner.main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ["--backend", "--strict", "--checks", "--report[=PATH]", "--verify[=N]", "--verify-action",
                   "--autotune", "--list", "--version", "-m MODULE"]:  # fmt: skip
        assert option in text
    assert "taken by attnpatch only when no --backend came before the script" in text
    assert "`--` ends attnpatch's options" in text
    for variable in env.VARIABLES:
        assert variable.name in text


def test_version_and_list(capsys) -> None:
    from attnpatch import __version__

    assert runner.main(["--version"]) == 0
    assert capsys.readouterr().out == f"attnpatch {__version__}\n"
    assert runner.main(["--list"]) == 0
    assert "native" in capsys.readouterr().out


# --- running exactly as python does ---------------------------------------------------------------------------


def _same_as_python(args: list[str], *, cwd: object = ROOT, stdin: str | None = None, flags: tuple = ()) -> None:
    # Each stream on its own, then both in one pipe: the order of output and traceback must match too.
    for merge in (False, True):
        plain = python(*flags, *args, cwd=cwd, stdin=stdin, merge=merge)
        ours = python(*flags, "-m", "attnpatch", "--backend", "native", *args, cwd=cwd, stdin=stdin, merge=merge)
        assert (ours.stdout, ours.stderr, ours.returncode) == (plain.stdout, plain.stderr, plain.returncode)


@pytest.mark.parametrize("action", ["", "raise", "exit-3", "exit-message", "ctrl-c", "hook"])
def test_script_runs_exactly_as_with_python(action: str) -> None:
    # Output, sys.argv, sys.path[0], __file__, globals, traceback text (chained exceptions, the script's own
    # excepthook), sys.exit values and the death by SIGINT of an uncaught KeyboardInterrupt.
    _same_as_python(["tests/scripts/show.py", action, "--flag", "x"])


@pytest.mark.parametrize("flag", ["-I", "-E", "-P", "-S"])
def test_interpreter_flags_apply_to_the_script_as_with_python(flag: str) -> None:
    # -I and -P put no script folder on sys.path, for python and the runner alike.
    _same_as_python(["tests/scripts/show.py", "raise"], flags=(flag,))


def test_stdin_is_the_scripts() -> None:
    _same_as_python([SHOW, "stdin"], stdin="hello from stdin")


def test_module_runs_exactly_as_with_python_m() -> None:
    _same_as_python(["-m", "show", "raise"], cwd=SCRIPTS)
    _same_as_python(["-m", "no_such_module_here"], cwd=SCRIPTS)


def test_script_from_stdin_and_a_syntax_error(tmp_path) -> None:
    _same_as_python(
        ["-", "a"], cwd=tmp_path, stdin="import sys\nprint(sys.argv, repr(sys.path[0]))\nraise SystemExit(4)\n"
    )
    (tmp_path / "broken.py").write_text("print('never')\nx = (\n")
    _same_as_python(["broken.py"], cwd=tmp_path)


# --- routing --------------------------------------------------------------------------------------------------


def _out(line: str) -> str:
    return line.strip().rsplit("out=", 1)[1]


def test_strict_backend_that_cannot_run_here_fails_at_the_first_attention_call() -> None:
    result = python("-m", "attnpatch", "--strict", "--backend", "_native_cudnn", PROBE)
    assert result.returncode == 1
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("attnpatch.errors.UnsupportedCall: no backend of '_native_cudnn'"), result.stderr
    assert "out = model(*inputs)" in result.stderr  # raised from the script's attention call


@pytest.mark.parametrize(
    ("args", "variables", "message"),
    [
        (["--backend", "falsh"], {}, "--backend='falsh': unknown attention backend 'falsh': did you mean 'flash'"),
        (["--backend=sage,flsh"], {}, "--backend='sage,flsh': unknown attention backend 'flsh'"),
        ([], {"ATTNPATCH_BACKEND": "falsh"}, "ATTNPATCH_BACKEND='falsh': unknown attention backend 'falsh'"),
        (["--report=/no/such/folder/r.json"], {}, "--report='/no/such/folder/r.json': cannot write the report"),
        (["--verify=often"], {}, "--verify='often': verify interval 'often' is not a positive integer"),
        (["--verify-action", "ignore"], {}, "--verify-action='ignore': verify action 'ignore' is not one of warn"),
        (["--strict", "--backend", "falsh"], {}, "--backend='falsh': unknown attention backend"),
    ],
    ids=["backend", "chain", "variable", "report", "verify", "verify-action", "strict"],
)
def test_option_errors_exit_2_before_the_script_starts(args: list[str], variables: dict, message: str) -> None:
    result = python("-m", "attnpatch", *args, SHOW, env=variables)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert f"python -m attnpatch: error: {message}" in result.stderr
    assert "ATTNPATCH_" not in result.stderr or variables, "an option is named as the user gave it"


def test_option_checks_import_nothing_heavy() -> None:
    code = (
        "import sys; from attnpatch.cli import run; "
        f"print(run.main(['--backend', 'flsh', {SHOW!r}]), sorted(m for m in sys.modules if m.startswith('torch'))[:1])"
    )
    result = python("-c", code)
    assert result.stdout.strip() == "2 []", result.stderr


def test_static_backend_names_are_the_registrys() -> None:
    from attnpatch.cli import _options
    from attnpatch.core import registry

    registered = {b.name for b in registry.list_backends() if b.builtin}
    assert set(_options.BACKEND_NAMES) == registered, "update BACKEND_NAMES in attnpatch/cli/_options.py"
    assert set(_options.BACKEND_ALIASES) == set(registry.aliases()), "update BACKEND_ALIASES in _options.py"
    for name in [*registered, *registry.aliases(), "auto", "Flash-Attn", "sage,flash,native"]:
        assert _options.backend_problem(name) is None, name


@pytest.mark.parametrize("value", ["1", "10", "0", "-2", "often", "1.5", "true"])
def test_verify_checks_agree_with_verify(value: str) -> None:
    from attnpatch import verify
    from attnpatch.cli import _options
    from attnpatch.errors import AttnpatchError

    try:
        verify.parse_every(value)
        valid = True
    except AttnpatchError:
        valid = False
    assert (_options.verify_problem(value) is None) == valid
    for action in ("warn", "fallback", "raise", "FALLBACK", "ignore", ""):
        try:
            verify.parse_action(action)
            valid = True
        except AttnpatchError:
            valid = False
        assert (_options.verify_action_problem(action) is None) == valid or action == "", action


def test_report_path_checks_agree_with_the_report(tmp_path) -> None:
    from attnpatch import report
    from attnpatch.cli import _options
    from attnpatch.errors import AttnpatchError

    for value in ["1", str(tmp_path / "r.json"), str(tmp_path), str(tmp_path / "no" / "r.json")]:
        try:
            report.check_path(value)
            valid = True
        except AttnpatchError:
            valid = False
        assert (_options.report_problem(value) is None) == valid, value
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_under_strict_exits_2_before_the_script() -> None:
    result = python("-m", "attnpatch", "--strict", "--backend", "falsh", SHOW)
    assert (result.returncode, result.stdout) == (2, "")
    assert "error: --backend='falsh': unknown attention backend 'falsh'" in result.stderr


def test_script_and_children_of_every_kind_are_routed() -> None:
    # The command line wins over ATTNPATCH_BACKEND, in the children too.
    result = python("-m", "attnpatch", PROBE, "children", "--backend", "_native_math", env={"ATTNPATCH_BACKEND": "x"})
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert sorted(lines) == ["fork", "forkserver", "main", "spawn", "subprocess"]
    for kind, line in lines.items():
        assert line.startswith("routed=1 served=_native_math"), f"{kind}: {line}"
        assert _out(line) == _out(unpatched_probe())  # the same result as the library's own attention
    assert attnpatch_lines(result.stderr) == []


def test_without_an_install_sitecustomize_patches_children(tmp_path) -> None:
    # A venv that sees torch and diffusers but has no attnpatch installed (no .pth, no editable finder): the
    # runner runs from the checkout, and a child finds attnpatch and its activation through PYTHONPATH alone.
    import venv

    venv.EnvBuilder(with_pip=False).create(tmp_path / "venv")
    bare = str(tmp_path / "venv" / "bin" / "python")
    bare_site = python("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", executable=bare).stdout
    (Path(bare_site.strip()) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check = python("-c", "import attnpatch", executable=bare, cwd=tmp_path)
    assert "No module named 'attnpatch'" in check.stderr
    result = python("-m", "attnpatch", "--backend", "_native_math", PROBE, "children", "subprocess", executable=bare)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("subprocess: routed=1 served=_native_math")


def test_sitecustomize_dir_is_the_checkouts() -> None:
    assert runner.sitecustomize_dir() == os.path.join(str(ROOT), "sitecustomize")


# --- the runner's report is apply()'s report ------------------------------------------------------------------

needs_models = pytest.mark.skipif(
    bool(__import__("attnpatch.testing.tiny", fromlist=["missing"]).missing()),
    reason="needs diffusers and transformers",
)
TINY_SD = str(SCRIPTS / "tiny_sd.py")


def _rows(data: dict) -> list[str]:
    from attnpatch import report

    return report.format_table(data).splitlines()[1:]  # the first line has the wall time


@needs_models
def test_the_runners_report_shows_the_rows_apply_shows(tmp_path) -> None:
    import json
    import sys

    from attnpatch import api, report

    sys.path.insert(0, str(SCRIPTS))
    try:
        import tiny_sd
    finally:
        sys.path.remove(str(SCRIPTS))
    pipe = tiny_sd.build()
    report.enable()
    try:
        tiny_sd.run(api.apply(pipe))
        applied = report.snapshot()
    finally:
        report.disable()
        api.unapply(pipe)
    path = tmp_path / "run.json"
    result = python("-m", "attnpatch", "--backend", "native", f"--report={path}", TINY_SD)
    assert result.returncode == 0, result.stderr
    ran = json.loads(path.read_text())
    assert [s["site"] for s in ran["sites"]] == [s["site"] for s in applied["sites"]]
    assert "<direct>" not in {s["site"] for s in ran["sites"]}
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1" in {s["site"] for s in ran["sites"]}
    assert _rows(ran) == _rows(applied)


@needs_models
def test_the_runners_report_lists_the_layers_it_leaves_alone(tmp_path) -> None:
    result = python("-m", "attnpatch", "--backend", "native", "--report", TINY_SD, "bmm")
    assert result.returncode == 0, result.stderr
    table = result.stderr[result.stderr.index("attnpatch report:") :]
    assert "attention layers left alone (not routed):" in table
    assert "AttnProcessor computes the attention probabilities itself (bmm + softmax)" in table
    assert "pipe.unet.set_attn_processor(AttnProcessor2_0())" in table
    assert "unet.down_blocks.*.attentions.*.transformer_blocks.*.attn1" in table  # listed as a row too
