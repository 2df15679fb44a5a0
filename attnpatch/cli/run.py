"""``python -m attnpatch [options] script.py|-m module [args]``: run a script with its attention routed.

The script runs in this process exactly as ``python script.py`` (or ``python -m module``) would run it: a fresh
``__main__`` module with the same ``__file__``, ``__loader__`` and ``__spec__``, the same ``sys.argv`` and
``sys.path[0]``, stdin untouched, and the same exit status and traceback, because an uncaught exception is left
to the interpreter's own handling (only our frames are cut from the traceback). coverage.py's ``PyRunner`` is the
model. Before the script starts, the runner activates attnpatch (:mod:`attnpatch.startup`, so the backend is
checked when diffusers or transformers is first imported, or at once under ``--strict``), and sets the
``ATTNPATCH_*`` variables and puts ``sitecustomize/`` first on PYTHONPATH, so the interpreters the script starts
(multiprocessing, subprocess, torchrun) are patched the same way.
"""

from __future__ import annotations

import builtins
import dataclasses
import os
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

from attnpatch import env, startup
from attnpatch.cli import _options

PROG = "python -m attnpatch"

USAGE = f"""\
usage: {PROG} [options] [--] script.py [script args]
       {PROG} [options] -m module [module args]
       {PROG} tune [tune options] script.py [args]
       {PROG} list | bench | demo | cache ..."""

OPTIONS = """\
options (before the script):
  --backend NAME         backend or fallback chain: flash, sage,flash,native, auto, ... (see --list)
  --strict               raise instead of falling back; an unknown backend exits with status 2 at once
  --checks               debug checks of device, dtype, shape and masks on every attention call
  --report[=PATH]        routing report on stderr at exit; a PATH ending in .json also gets JSON
  --verify[=N]           recompute sampled calls in float64: the first per module and shape, or every Nth
  --verify-action ACTION what a verify failure does: warn (default), fallback or raise
  --autotune             with backend auto (the default backend with --autotune): time the candidates
  --plan PATH            attention plan (`python -m attnpatch tune` writes one): each layer's backend, per step
  --list                 list the backends and whether they run here, then exit
  --version              print attnpatch's version and exit
  -h, --help             show this help and exit
  -m MODULE              run a module as a script, like python -m (its arguments follow it)"""

RULES = f"""\
which arguments are attnpatch's:
  Options before the script are attnpatch's. After the script, --backend X / --backend=X (the first one) is
  taken by attnpatch only when no --backend came before the script, so that
  `{PROG} script.py --backend flash` works; every other argument after the script is the
  script's, unchanged and in order.
  `--` ends attnpatch's options. Before the script it marks the next argument as the script and leaves every
  later one, --backend included, to the script. After the script it is passed on to the script, and nothing
  after it is taken.
  Options win over the environment variables. With no backend anywhere, calls go to native (to auto with
  --autotune). An unknown backend name, a report path that cannot be written, a plan file that cannot be used,
  or a --verify or --verify-action value that means nothing is an error, exit status 2, before the script starts
  (named as you gave it: the option, or the ATTNPATCH_* variable it came from)."""


def help_text() -> str:
    return "\n\n".join(
        [
            USAGE,
            "Run a Python script or module with the attention of its diffusers and transformers models routed to\n"
            "the backend you choose. It runs in-process exactly as `python script.py` would (same __main__,\n"
            "sys.argv, sys.path[0], stdin, exit status and traceback); the interpreters it starts (multiprocessing,\n"
            "subprocess, torchrun) are patched too.",
            OPTIONS,
            RULES,
            "environment variables (also read by any interpreter where attnpatch is installed):\n" + env.describe(),
        ]
    )


class UsageError(Exception):
    """A command line we cannot run: printed as one line, exit status 2."""


@dataclasses.dataclass
class Options:
    backend: str | None = None
    strict: bool = False
    checks: bool = False
    report: str | None = None
    verify: str | None = None
    verify_action: str | None = None
    autotune: bool = False
    plan: str | None = None
    list_backends: bool = False
    show_version: bool = False
    show_help: bool = False
    module: bool = False  # target is a module name (-m), not a path
    target: str | None = None
    args: list[str] = dataclasses.field(default_factory=list)  # the script's own arguments (sys.argv[1:])
    given: set[str] = dataclasses.field(default_factory=set)  # Settings fields set on the command line

    def settings(self) -> startup.Settings | None:
        """These options over the ATTNPATCH_* variables; None when ATTNPATCH_DISABLE is set."""
        base = startup.Settings.from_env()
        if base is None:
            return None
        merged = base.replace(**{name: getattr(self, name) for name in self.given}, from_cli=frozenset(self.given))
        if merged.backend is None:
            merged = merged.replace(backend="auto" if merged.autotune else "native")
        if merged.plan:  # children may start in another folder
            merged = merged.replace(plan=os.path.abspath(os.path.expanduser(merged.plan)))
        return merged


_FLAGS = {
    "--strict": "strict",
    "--checks": "checks",
    "--autotune": "autotune",
    "--list": "list_backends",
    "--version": "show_version",
    "--help": "show_help",
    "-h": "show_help",
}
_VALUE_AFTER_EQUALS_ONLY = {"--report": "report", "--verify": "verify"}  # `--report script.py` runs script.py
_VALUE = {"--backend": "backend", "--verify-action": "verify_action", "--plan": "plan"}


def parse(argv: Sequence[str]) -> Options:
    """Split the command line into attnpatch's options and the script's (see RULES)."""
    argv = list(argv)
    opts = Options()
    i = 0
    rest: list[str] = []
    scan_rest = True
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            if i + 1 == len(argv):
                raise UsageError("'--' must be followed by the script to run")
            opts.target, rest, scan_rest = argv[i + 1], argv[i + 2 :], False
            break
        if arg.startswith("-m") and not arg.startswith("--"):
            if arg == "-m" and i + 1 == len(argv):
                raise UsageError("-m needs a module name, e.g. -m my_package.generate")
            opts.module = True
            opts.target, rest = (argv[i + 1], argv[i + 2 :]) if arg == "-m" else (arg[2:], argv[i + 1 :])
            break
        if arg == "-" or not arg.startswith("-"):
            opts.target, rest = arg, argv[i + 1 :]
            break
        name, equals, value = arg.partition("=")
        if name in _FLAGS:
            if equals:
                raise UsageError(f"{name} takes no value (got {arg!r})")
            setattr(opts, _FLAGS[name], True)
            if _FLAGS[name] in startup.LABELS:
                opts.given.add(_FLAGS[name])
        elif name in _VALUE_AFTER_EQUALS_ONLY:
            if equals and not value.strip():
                raise UsageError(f"{name}= needs a value, or leave out the '=': {name}")
            setattr(opts, _VALUE_AFTER_EQUALS_ONLY[name], value if equals else "1")
            opts.given.add(_VALUE_AFTER_EQUALS_ONLY[name])
        elif name in _VALUE:
            if not equals:
                if i + 1 == len(argv):
                    raise UsageError(f"{name} needs a value")
                i += 1
                value = argv[i]
            _set_value(opts, name, value)
        else:
            raise UsageError(f"unknown option {arg!r}: attnpatch's options go before the script (see {PROG} --help)")
        i += 1
    if scan_rest and "backend" not in opts.given:
        rest = _take_backend(opts, rest)
    opts.args = rest
    return opts


def _set_value(opts: Options, name: str, value: str) -> None:
    if not value.strip():
        raise UsageError(f"{name} needs a non-empty value")
    setattr(opts, _VALUE[name], value.strip())
    opts.given.add(_VALUE[name])


def _take_backend(opts: Options, rest: list[str]) -> list[str]:
    # The first --backend after the script, up to a `--`, is attnpatch's; the rest stays the script's.
    for j, arg in enumerate(rest):
        if arg == "--":
            break
        if arg == "--backend":
            if j + 1 == len(rest):
                raise UsageError("--backend needs a value")
            _set_value(opts, arg, rest[j + 1])
            return rest[:j] + rest[j + 2 :]
        if arg.startswith("--backend="):
            _set_value(opts, "--backend", arg.partition("=")[2])
            return rest[:j] + rest[j + 1 :]
    return rest


def main(argv: Sequence[str]) -> int:
    try:
        opts = parse(argv)
    except UsageError as exc:
        return _usage_error(str(exc))
    if opts.show_help:
        print(help_text())
        return 0
    if opts.show_version:
        from attnpatch import __version__

        print(f"attnpatch {__version__}")
        return 0
    if opts.list_backends:
        from attnpatch.cli import backends as list_command

        return list_command.main([])
    if opts.target is None:
        return _usage_error("no script to run")
    if not opts.module and opts.target != "-" and not os.path.exists(opts.target):
        print(f"No file to run: '{opts.target}'", file=sys.stderr)
        return 2

    settings = opts.settings()
    if settings is None:
        startup.say(f"ATTNPATCH_DISABLE is set: running {opts.target} unpatched")
    else:
        problem = check(settings)
        if problem is not None:
            return _usage_error(problem)
        _export(settings)
        problem = startup.activate(settings)
        if problem is not None:
            return _usage_error(problem)
    run_target(opts.target, opts.args, module=opts.module)
    return 0


def run_target(target: str, args: list[str], *, module: bool = False) -> None:
    """Run ``target`` (a path, ``-``, or with ``module`` a module name) as ``python`` would, in this process."""
    if module:
        _run_module(target, args)
    else:
        _run_path(target, args)


def _plan_problem(value: str) -> str | None:
    # The plan file's structure, globs and steps (its backends are checked when it is applied: the script may
    # register its own). The one check here that imports torch, and only when a plan is given.
    from attnpatch.api import plans

    return plans.problem(value)


# Settings field -> its check (attnpatch.cli._options), run before the script starts.
_CHECKS = (
    ("backend", _options.backend_problem),
    ("report", _options.report_problem),
    ("verify", _options.verify_problem),
    ("verify_action", _options.verify_action_problem),
    ("plan", _plan_problem),
)


def check(settings: startup.Settings) -> str | None:
    """The first value of ``settings`` that cannot work, named as the user gave it; None when all can."""
    for field, problem_of in _CHECKS:
        value = getattr(settings, field)
        problem = problem_of(value) if isinstance(value, str) else None
        if problem is not None:
            return f"{settings.label(field)}={value!r}: {problem}"
    return None


def _usage_error(message: str) -> int:
    print(f"{USAGE}\n{PROG}: error: {message}", file=sys.stderr)
    return 2


# --- child interpreters ---------------------------------------------------------------------------------------


def _export(settings: startup.Settings) -> None:
    """Set what a child interpreter needs to activate like this one: ATTNPATCH_* and PYTHONPATH."""
    for name, value in settings.environ().items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    first = [d for d in (sitecustomize_dir(), _package_root_if_needed()) if d]
    existing = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in first]
    os.environ["PYTHONPATH"] = os.pathsep.join(first + existing)


def sitecustomize_dir() -> str | None:
    """The folder with our sitecustomize.py: in the package (a wheel) or beside it (a checkout)."""
    package = os.path.dirname(os.path.abspath(startup.__file__))
    for folder in (os.path.join(package, "_sitecustomize"), os.path.join(os.path.dirname(package), "sitecustomize")):
        if os.path.isfile(os.path.join(folder, "sitecustomize.py")):
            return folder
    return None


def _package_root_if_needed() -> str | None:
    # A child must import the attnpatch this process runs. When that one was found only through the directory
    # this process was started from (a checkout, `python -m attnpatch` without an install), a child started
    # elsewhere would not find it: then its parent folder goes on PYTHONPATH too.
    import importlib.machinery

    package = os.path.realpath(os.path.dirname(startup.__file__))
    path = sys.path if getattr(sys.flags, "safe_path", False) else sys.path[1:]
    for finder in sys.meta_path:
        if startup.is_own_finder(finder) or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec("attnpatch", path if finder is importlib.machinery.PathFinder else None)
        if spec is not None and spec.origin:
            return None if os.path.realpath(os.path.dirname(spec.origin)) == package else os.path.dirname(package)
    return os.path.dirname(package)


# --- running the script ---------------------------------------------------------------------------------------


def _fresh_main() -> types.ModuleType:
    # What the interpreter's own __main__ has before a script runs (pylifecycle's add_main_module).
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    main.__annotations__ = {}
    sys.modules["__main__"] = main
    return main


def _set_path0(path0: str) -> None:
    # sys.path[0] is the entry the interpreter added for us (the current directory for -m, the console script's
    # folder for `attnpatch`): replace it with what `python script.py` would have put there. Under -P / -I
    # nothing was added, and nothing is added for the script either.
    if not getattr(sys.flags, "safe_path", False):
        sys.path[0] = path0


def _run_path(target: str, args: list[str]) -> None:
    import importlib.machinery
    import importlib.util
    import marshal

    sys.argv = [target, *args]
    if target == "-":
        _set_path0("")
        code = _compile(sys.stdin.read(), "<stdin>")
        main = _fresh_main()
        main.__file__ = "<stdin>"
        main.__cached__ = None  # type: ignore[attr-defined]
        main.__loader__ = importlib.machinery.BuiltinImporter
        _call_user(exec, code, main.__dict__)
        return
    if os.path.isdir(target) or _is_zip(target):
        # `python app/` and `python app.pyz` run the __main__ module found inside, with it first on sys.path.
        import runpy

        _set_path0(os.path.abspath(target))
        _fresh_main()
        _call_user(runpy._run_module_as_main, "__main__", False)  # type: ignore[attr-defined]
        return
    path = os.path.abspath(target)
    _set_path0(os.path.dirname(os.path.realpath(target)))
    with open(path, "rb") as f:
        source = f.read()
    loader: type[importlib.machinery.SourceFileLoader | importlib.machinery.SourcelessFileLoader]
    if source[:4] == importlib.util.MAGIC_NUMBER:  # a .pyc file, which python runs too
        code, loader = marshal.loads(source[16:]), importlib.machinery.SourcelessFileLoader
    else:
        code, loader = _compile(source, path), importlib.machinery.SourceFileLoader
    main = _fresh_main()
    main.__file__ = path
    main.__cached__ = None  # type: ignore[attr-defined]
    main.__loader__ = loader("__main__", path)
    _call_user(exec, code, main.__dict__)


def _run_module(name: str, args: list[str]) -> None:
    import runpy

    sys.argv = ["-m", *args]  # as python -m does while it looks for the module; runpy sets argv[0] to its file
    _set_path0(os.getcwd())
    _fresh_main()
    _call_user(runpy._run_module_as_main, name, True)  # type: ignore[attr-defined]


def _is_zip(path: str) -> bool:
    import zipfile

    return not path.endswith(".py") and os.path.isfile(path) and zipfile.is_zipfile(path)


def _compile(source: str | bytes, path: str) -> types.CodeType:
    try:
        return compile(source, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        # Shown as python shows a script that does not compile: the error alone, none of our frames.
        _flush_std()
        _trim_traceback_at_exit(exc)
        raise


def _call_user(function: Callable[..., Any], *args: Any) -> None:
    """Call the user's code. An exception it raises goes up to the interpreter, which handles it exactly as for
    ``python script.py`` (exit status 1, or death by SIGINT for Ctrl-C; ``sys.last_*``; ``-i``), except that
    the traceback shown starts at the user's first frame."""
    try:
        function(*args)
    except BaseException as exc:
        _flush_std()
        if not isinstance(exc, SystemExit):
            _trim_traceback_at_exit(exc)
        raise


def _flush_std() -> None:
    # Python flushes stdout and stderr before it reports how a script ended (flush_io in pythonrun.c); an
    # exception leaving through runpy is reported unflushed, i.e. before the script's output in a combined log.
    for stream in (sys.stderr, sys.stdout):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # as in python: a stream that cannot be flushed does not hide the error
            pass


def _trim_traceback_at_exit(exc: BaseException) -> None:
    """When ``exc`` reaches the interpreter uncaught, show its traceback without our frames."""
    hook = sys.excepthook  # the user's own, if the script installed one

    def excepthook(kind: type[BaseException], value: BaseException, tb: types.TracebackType | None) -> None:
        sys.excepthook = hook
        if value is exc:
            tb = _user_traceback(tb)
            value.with_traceback(tb)
        hook(kind, value, tb)

    sys.excepthook = excepthook


def _user_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    # Everything up to and including _call_user's frame is ours (runpy, cli, runner); none if the error was ours.
    user = None
    while tb is not None:
        if tb.tb_frame.f_code is _call_user.__code__:
            user = tb.tb_next
        tb = tb.tb_next
    return user
