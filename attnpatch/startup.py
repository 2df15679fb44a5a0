"""Zero-code activation at interpreter start: what ``attnpatch-startup.pth`` and ``sitecustomize`` call.

Installing attnpatch puts one line in site-packages (``sitecustomize/attnpatch-startup.pth``)::

    import os; (os.environ.get('ATTNPATCH_BACKEND') or os.environ.get('ATTNPATCH_PLAN')) and ...startup.run()

With ATTNPATCH_BACKEND and ATTNPATCH_PLAN unset or empty this module is not even imported: interpreter start pays
two dictionary lookups. With either set, :func:`run` reads every ``ATTNPATCH_*`` variable (:mod:`attnpatch.env`)
and, unless ATTNPATCH_DISABLE is set, activates attnpatch: ``api.install(backend, strict=..., checks=...)`` plus
the report, verify, autotune and plan features whose variables are set (a plan is applied to each pipeline or
model at its first forward call: attnpatch.api.plan_apply; ATTNPATCH_PLAN alone routes the layers it has no rule
for to ``native``). When:

- Normally at the first import of diffusers or transformers, just before the library's first line runs (so the
  patchers' post-import hooks are in place before any of its modules binds a name), or just after the first
  import of ``attnpatch.core.dispatch`` (a script calling the dispatcher itself gets ATTNPATCH_BACKEND as its
  default). Until then only a small ``sys.meta_path`` entry waits, importing neither torch nor wrapt: a process
  that never imports those libraries pays a few milliseconds, not the ~1 s of importing torch.
- The backend name is checked at that moment. The valid names come from the backend registry, which needs
  torch, and torch is being imported then anyway. An unknown name gives one line on stderr naming the value and
  the valid choices, and the libraries run unpatched.
- With ATTNPATCH_STRICT=1, at once: interpreter start imports torch, so that an unknown name exits with status 2
  before the script starts instead of surfacing later.

Never raises: an internal error is one line on stderr and an unpatched process (a partial install is undone).
Idempotent: a .pth seen twice (``lib64 -> lib`` in a venv) or the .pth plus the runner's sitecustomize in one
child activate once. Nothing read from the environment is imported or executed: the values are names and paths.
"""

from __future__ import annotations

import _thread
import os
import sys

from attnpatch import env

# Annotations only: typing alone would add ~9 ms to every start with the variable set (dataclasses ~15 ms).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import ModuleType
    from typing import Any

# The first import of one of these activates attnpatch just before the module's first line runs.
BEFORE = frozenset({"diffusers", "transformers"})
# ... or just after this one is imported (activation imports it itself, so it cannot come first).
AFTER = "attnpatch.core.dispatch"

UNPATCHED = "running unpatched"
# The pid of the process whose report the run's other processes report beside (attnpatch.report.PARENT_VARIABLE).
REPORT_PARENT = "ATTNPATCH_REPORT_PARENT"

# field -> (environment variable, runner option), to name a value the way the user gave it.
LABELS = {
    "backend": ("ATTNPATCH_BACKEND", "--backend"),
    "strict": ("ATTNPATCH_STRICT", "--strict"),
    "checks": ("ATTNPATCH_CHECKS", "--checks"),
    "report": ("ATTNPATCH_REPORT", "--report"),
    "verify": ("ATTNPATCH_VERIFY", "--verify"),
    "verify_action": ("ATTNPATCH_VERIFY_ACTION", "--verify-action"),
    "autotune": ("ATTNPATCH_AUTOTUNE", "--autotune"),
    "plan": ("ATTNPATCH_PLAN", "--plan"),
}


class Settings:
    """What to activate. Strings are passed on as given: the feature modules parse and check them.

    A plain class rather than a dataclass, to keep ``dataclasses`` (and ``inspect``) out of interpreter start.
    """

    __slots__ = ("autotune", "backend", "checks", "from_cli", "plan", "report", "strict", "verify", "verify_action")

    def __init__(
        self,
        backend: str | None,
        strict: bool = False,
        checks: bool = False,
        report: str | None = None,  # "1" (table on stderr at exit) or a path
        verify: str | None = None,  # "1" (first call per module and shape) or N (every Nth call)
        verify_action: str | None = None,  # warn | fallback | raise
        autotune: bool = False,
        from_cli: frozenset[str] = frozenset(),  # fields given on the runner's command line (for messages)
        plan: str | None = None,  # path of an attention plan (attnpatch.api.plans)
    ) -> None:
        self.backend = backend
        self.strict = strict
        self.checks = checks
        self.report = report
        self.verify = verify
        self.verify_action = verify_action
        self.autotune = autotune
        self.from_cli = from_cli
        self.plan = plan

    def _values(self) -> tuple[object, ...]:
        # What is activated (every field but from_cli, which only changes how messages name things).
        return tuple(getattr(self, name) for name in LABELS)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in LABELS)
        return f"Settings({fields})"

    def replace(self, **changes: Any) -> Settings:
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return Settings(**values)

    @classmethod
    def from_env(cls) -> Settings | None:
        """The ATTNPATCH_* variables; None when ATTNPATCH_DISABLE is set. ``backend`` is None when unset."""
        if env.disabled():
            return None
        return cls(
            backend=env.backend(),
            strict=env.strict(),
            checks=env.checks(),
            report=_value_if_on("ATTNPATCH_REPORT"),
            verify=_value_if_on("ATTNPATCH_VERIFY"),
            verify_action=env.raw("ATTNPATCH_VERIFY_ACTION"),
            autotune=env.flag("ATTNPATCH_AUTOTUNE"),
            plan=env.plan(),
        )

    def environ(self) -> dict[str, str | None]:
        """The variables that make a child interpreter activate with these settings (None: unset it)."""
        return {
            "ATTNPATCH_BACKEND": self.backend,
            "ATTNPATCH_STRICT": "1" if self.strict else None,
            "ATTNPATCH_CHECKS": "1" if self.checks else None,
            "ATTNPATCH_REPORT": self.report,
            "ATTNPATCH_VERIFY": self.verify,
            "ATTNPATCH_VERIFY_ACTION": self.verify_action,
            "ATTNPATCH_AUTOTUNE": "1" if self.autotune else None,
            "ATTNPATCH_PLAN": self.plan,
        }

    def label(self, field: str) -> str:
        variable, option = LABELS[field]
        return option if field in self.from_cli else variable


def _value_if_on(name: str) -> str | None:
    return env.raw(name) if env.flag(name) else None


# --- state ----------------------------------------------------------------------------------------------------

_ran = False  # run() was called in this process
_pending: Settings | None = None  # waiting for the first import of a trigger module
_active: Settings | None = None  # what is installed now
_lock = _thread.allocate_lock()  # _thread, not threading: it is already imported at interpreter start


def run() -> None:
    """The .pth line and sitecustomize call this: activate from ATTNPATCH_* or do nothing. Never raises.

    The one exception to "never crash": ATTNPATCH_STRICT=1 with an unknown backend ends the process with status
    2 before the script starts, as documented. ``sys.exit`` cannot do that during interpreter start (a
    SystemExit raised by a .pth line or sitecustomize is a fatal error), so this flushes and uses ``os._exit``.
    """
    global _ran
    if _ran:
        return
    _ran = True
    try:
        settings = Settings.from_env()
        if settings is not None and settings.backend is None and settings.plan is not None:
            settings = settings.replace(backend="native")  # a plan alone: its rules choose, native elsewhere
        problem = activate(settings) if settings is not None and settings.backend is not None else None
    except Exception as exc:  # never break the user's interpreter start
        say(f"startup failed ({type(exc).__name__}: {exc}); {UNPATCHED}")
        return
    if problem is not None:
        say(f"{problem}; exiting with status 2 because ATTNPATCH_STRICT is set")
        _exit_now(2)


def activate(settings: Settings) -> str | None:
    """Activate with ``settings`` now (strict mode, or a library already imported) or at the first import.

    Returns the problem, without activating anything, when strict mode finds the backend invalid: the caller
    exits with status 2. Otherwise returns None, and any problem is one line on stderr. Activating again with
    other settings (the runner after the .pth line) replaces them. Never raises.
    """
    global _pending
    if settings.backend is None:
        raise ValueError("Settings.backend is None: nothing to activate")
    if settings == _active:
        return None
    if settings.strict:
        try:
            problem = _backend_problem(settings)
        except Exception as exc:
            say(f"activation failed ({type(exc).__name__}: {exc}); {UNPATCHED}")
            return None
        if problem is None and settings.plan:
            problem = _plan_problem(settings)
        if problem is not None:
            return problem
    if settings.report and not os.environ.get(REPORT_PARENT):
        # The first process of the run to activate a report is the parent: the interpreters it starts inherit
        # this and write their own report files beside its file (attnpatch.report) instead of overwriting it.
        os.environ[REPORT_PARENT] = str(os.getpid())
    _pending = settings
    if settings.strict or any(name in sys.modules for name in (*BEFORE, AFTER)):
        _fire()
    else:
        _add_hook()
    return None


def active() -> Settings | None:
    """The settings installed in this process (None while none is, or while waiting for the first import)."""
    return _active


def pending() -> Settings | None:
    """The settings waiting for the first import of diffusers, transformers or attnpatch.core.dispatch."""
    return _pending


def say(message: str) -> None:
    """One line on stderr, prefixed ``attnpatch:``."""
    stream = sys.stderr
    if stream is None:  # pythonw has no stderr
        return
    try:
        stream.write(f"attnpatch: {message}\n")
        stream.flush()
    except (OSError, ValueError):  # closed or broken stderr: nothing more we can do, and no reason to crash
        pass


def _exit_now(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(status)


# --- activation -----------------------------------------------------------------------------------------------


def _fire() -> None:
    # Take the pending settings (once, whichever thread gets here first), check the backend and install.
    global _pending
    with _lock:
        settings, _pending = _pending, None
    _remove_hook()
    if settings is None:
        return
    try:
        problem = _backend_problem(settings)
        if problem is not None:
            if _active is not None:
                _undo()  # the runner replaced good settings from the environment by a bad name
            strict = "--strict" if settings.from_cli else "ATTNPATCH_STRICT=1"
            say(f"{problem}; {UNPATCHED} ({strict} makes this an error)")
            return
        _install(settings)
    except Exception as exc:  # an import must never fail because of us
        say(f"activation failed ({type(exc).__name__}: {exc}); {UNPATCHED}")


def _backend_problem(settings: Settings) -> str | None:
    """None when the backend selection resolves, else one line naming the value and the valid choices."""
    from attnpatch.core import selection  # imports torch
    from attnpatch.errors import UnknownBackendError, shown

    try:
        selection.resolve(settings.backend)  # type: ignore[arg-type]
    except UnknownBackendError as exc:
        return f"{settings.label('backend')}={shown(settings.backend)}: {exc}"
    return None


def _plan_problem(settings: Settings) -> str | None:
    """None when the plan file can be used (its backends are checked when it is applied), else one line."""
    try:
        from attnpatch.api import plans  # imports torch: strict mode only
    except ModuleNotFoundError as exc:
        return f"{settings.label('plan')} is set, but attnpatch.api.plans cannot be imported ({exc})"
    problem = plans.problem(settings.plan)  # type: ignore[arg-type]
    return None if problem is None else f"{settings.label('plan')}: {problem}"


def _install(settings: Settings) -> None:
    global _active
    try:
        from attnpatch import api

        api.install(settings.backend, strict=settings.strict or None, checks=settings.checks or None)
    except Exception as exc:
        from attnpatch.errors import shown  # the error path only: startup imports nothing it does not need

        _undo()
        say(f"could not activate backend {shown(settings.backend)} ({type(exc).__name__}: {exc}); {UNPATCHED}")
        return
    _active = settings
    for field, module_name, enable in _FEATURES:
        value = getattr(settings, field)
        if value:
            _enable_feature(settings, field, module_name, enable)


def _undo() -> None:
    """Take back api.install (a failed or replaced activation): the libraries run their own code again."""
    global _active
    _active = None
    try:
        from attnpatch import api

        plan_apply = sys.modules.get("attnpatch.api.plan_apply")
        if plan_apply is not None:
            plan_apply.deactivate()
        api.uninstall()
    except Exception as exc:
        say(f"could not undo the activation ({type(exc).__name__}: {exc})")


# (Settings field, module, how to switch it on). Each feature module is imported only when its value is set.
_FEATURES: tuple[tuple[str, str, Callable[[Any, Settings], None]], ...] = (
    ("report", "attnpatch.report", lambda module, s: module.enable(s.report)),
    ("verify", "attnpatch.verify", lambda module, s: module.enable(s.verify, s.verify_action)),
    ("autotune", "attnpatch.autotune", lambda module, s: module.enable()),
    ("plan", "attnpatch.api.plan_apply", lambda module, s: module.activate(s.plan)),
)


def _enable_feature(settings: Settings, field: str, module_name: str, enable: Callable[[Any, Settings], None]) -> None:
    import importlib

    label = settings.label(field)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            say(f"{label} is set, but {module_name} cannot be imported ({exc}); {label} is ignored")
        else:
            say(f"{label} is set, but this attnpatch has no {module_name}; {label} is ignored")
        return
    try:
        enable(module, settings)
    except Exception as exc:
        from attnpatch.errors import shown

        value = getattr(settings, field)
        shown_value = "" if value is True else f"={shown(value)}"
        say(f"{label}{shown_value}: {exc}; {label} is ignored")


# --- the import hook ------------------------------------------------------------------------------------------


class _ImportHook:
    """A ``sys.meta_path`` entry that finds nothing itself: it activates attnpatch around the first import of a
    trigger module (before it runs, or after it for AFTER), hands the import to the other finders and goes away."""

    busy = False

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> Any:
        if self.busy or (fullname not in BEFORE and fullname != AFTER):
            return None
        if any(_initializing(name) for name in ("torch", AFTER)):
            # A probe (importlib.util.find_spec) from inside torch's or our dispatcher's own import: activating
            # now would import them half-built. The library's real import comes later and activates then.
            return None
        self.busy = True  # activation imports modules too (and probes the libraries with find_spec)
        try:
            if fullname == AFTER:
                spec = _find_elsewhere(fullname, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = _ActivateAfter(spec.loader)
                return spec
            if _find_elsewhere(fullname, path, target) is None:
                # The library is not installed (a probe with importlib.util.find_spec, or an import that fails):
                # nothing to patch, so nothing is imported (activation would import torch for nothing).
                return None
            # Import-time work runs under the interpreter's import lock here; what we import (torch, wrapt,
            # attnpatch) does not start threads that import, so this cannot deadlock.
            _fire()
            # Asked again, not left to the import system's loop: activation may have added finders (wrapt's
            # post-import hook finder) that this very import must go through.
            return _find_elsewhere(fullname, path, target)
        finally:
            self.busy = False


class _ActivateAfter:
    """Loader proxy: runs the real loader, puts it back on the module, then activates."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        _fire()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


_hook: _ImportHook | None = None


def is_own_finder(finder: object) -> bool:
    """Whether ``finder`` (a ``sys.meta_path`` entry) is the activation hook this module put there."""
    return isinstance(finder, _ImportHook)


def _initializing(name: str) -> bool:
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _find_elsewhere(fullname: str, path: Sequence[str] | None, target: ModuleType | None) -> Any:
    for finder in list(sys.meta_path):
        find_spec = getattr(finder, "find_spec", None)
        if isinstance(finder, _ImportHook) or find_spec is None:
            continue
        spec = find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def _add_hook() -> None:
    global _hook
    if _hook is None:
        _hook = _ImportHook()
        sys.meta_path.insert(0, _hook)


def _remove_hook() -> None:
    global _hook
    hook, _hook = _hook, None
    if hook is not None and hook in sys.meta_path:
        sys.meta_path.remove(hook)
