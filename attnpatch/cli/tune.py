"""``python -m attnpatch tune script.py [args] --budget 1e-2 --out plan.json``: write an attention plan.

The script runs as the runner runs it (in this process, ``native`` everywhere). At the first call of each kind
(device, dtype, shape bucket, mask, causal: :func:`attnpatch.autotune.kind_of`) of each attention layer, every
candidate backend that can serve the call is timed on the call's own tensors and its error measured against
float64 (:func:`attnpatch.autotune.measure`). The plan (docs/plans.md, :mod:`attnpatch.api.plans`) gets, per layer,
the fastest candidate whose error on every kind of the layer is within the budget, with every candidate's
measurements; layers whose paths differ only in their numbers and chose alike become one rule
(``transformer.transformer_blocks.*.attn``). The file is rewritten after each measurement, so Ctrl-C (or a script
that fails) keeps what was measured. Calls in the processes the script starts are not measured.

Candidates: ``--candidates a,b`` or every registered backend that can serve the call (a backend the script
registers with ``attnpatch.register_backend`` included; lossy ones too: the budget is what keeps them out).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from attnpatch.cli import run

USAGE = """\
usage: python -m attnpatch tune [options] script.py [script args] [options]
       python -m attnpatch tune [options] -m module [module args]"""

HELP = f"""{USAGE}

Run the script, measure every candidate backend on each attention layer's calls (time, and error against
float64), and write a plan: per layer, the fastest backend within the error budget.

options (before the script, or after it: there the first of each is taken, up to a `--`):
  --budget X          largest error a backend may have, in --metric units (default 0.01)
  --metric M          max_abs (largest |out - ref|, default) or rel (that over the largest |ref|)
  --candidates A,B    backends to measure (default: every one registered that can serve the call)
  --out PATH          where to write the plan (default plan.json)
  -h, --help          show this help

Apply the plan: python -m attnpatch --plan plan.json script.py, ATTNPATCH_PLAN=plan.json, or
attnpatch.apply(pipe, plan="plan.json"). See docs/plans.md."""

_OPTIONS = ("--budget", "--metric", "--candidates", "--out")


class Options:
    def __init__(self) -> None:
        self.budget = 0.01
        self.metric = "max_abs"
        self.candidates: list[str] | None = None
        self.out = "plan.json"
        self.module = False
        self.target: str | None = None
        self.args: list[str] = []
        self.help = False
        self.given: set[str] = set()


def parse(argv: Sequence[str]) -> Options:
    """Options before the script, then the script and its arguments, of which the first of each tune option
    (up to a ``--``) is taken as tune's when it was not given before the script."""
    opts = Options()
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            opts.help = True
            return opts
        if arg == "--":
            if i + 1 == len(argv):
                raise run.UsageError("'--' must be followed by the script to run")
            opts.target, opts.args = argv[i + 1], argv[i + 2 :]
            return opts
        if arg.startswith("-m") and not arg.startswith("--"):
            if arg == "-m" and i + 1 == len(argv):
                raise run.UsageError("-m needs a module name, e.g. -m my_package.generate")
            opts.module = True
            opts.target, rest = (argv[i + 1], argv[i + 2 :]) if arg == "-m" else (arg[2:], argv[i + 1 :])
            opts.args = _take_options(opts, rest)
            return opts
        if arg == "-" or not arg.startswith("-"):
            opts.target = arg
            opts.args = _take_options(opts, argv[i + 1 :])
            return opts
        taken = _option(opts, argv, i)
        if taken is None:
            raise run.UsageError(f"unknown tune option {arg!r} (see python -m attnpatch tune --help)")
        i = taken
    return opts


def _option(opts: Options, argv: list[str], i: int) -> int | None:
    """Set the option at argv[i] (``--x v`` or ``--x=v``); the index after it, or None if it is no tune option."""
    name, equals, value = argv[i].partition("=")
    if name not in _OPTIONS:
        return None
    if not equals:
        if i + 1 == len(argv):
            raise run.UsageError(f"{name} needs a value")
        value, i = argv[i + 1], i + 1
    value = value.strip()
    if name == "--budget":
        try:
            opts.budget = float(value)
        except ValueError:
            opts.budget = -1.0
        if not opts.budget >= 0 or opts.budget == float("inf"):
            raise run.UsageError(f"--budget {value!r} is not a number >= 0: give the largest error, e.g. 1e-2")
    elif name == "--metric":
        if value not in ("max_abs", "rel"):
            raise run.UsageError(f"--metric {value!r} is not max_abs or rel")
        opts.metric = value
    elif name == "--candidates":
        names = [n.strip() for n in value.split(",") if n.strip()]
        if not names:
            raise run.UsageError(f"--candidates {value!r} names no backend: give names such as native,flex")
        opts.candidates = names
    else:
        if not value:
            raise run.UsageError("--out needs a path, e.g. --out plan.json")
        opts.out = value
    opts.given.add(name)
    return i + 1


def _take_options(opts: Options, rest: list[str]) -> list[str]:
    kept: list[str] = []
    j = 0
    while j < len(rest):
        name = rest[j].partition("=")[0]
        if rest[j] == "--":
            return kept + rest[j:]
        if name in _OPTIONS and name not in opts.given:
            j = _option(opts, rest, j) or j + 1
            continue
        kept.append(rest[j])
        j += 1
    return kept


def main(argv: Sequence[str]) -> int:
    try:
        opts = parse(argv)
    except run.UsageError as exc:
        return _usage_error(str(exc))
    if opts.help:
        print(HELP)
        return 0
    if opts.target is None:
        return _usage_error("no script to run")
    import os

    if not opts.module and opts.target != "-" and not os.path.exists(opts.target):
        print(f"No file to run: '{opts.target}'", file=sys.stderr)
        return 2
    from attnpatch.report import check_path

    try:
        out = check_path(opts.out, "the plan", "--out PATH")
    except Exception as exc:
        return _usage_error(str(exc))
    if out is None:
        return _usage_error(f"--out {opts.out!r} is not a file name: give a path such as plan.json")

    from attnpatch import startup
    from attnpatch.cli import _tuner
    from attnpatch.core import hooks

    tuner = _tuner.Tuner(opts.budget, opts.metric, opts.candidates, out)
    # Routed everywhere on native (the measurement needs every call; native is what the script computes unpatched).
    startup.activate(startup.Settings(backend="native"))
    hooks.add_observer(tuner.observe)
    status = 0
    try:
        run.run_target(opts.target, opts.args, module=opts.module)
    except KeyboardInterrupt:
        tuner.finish(interrupted=True)
        return 130
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if status:
            tuner.finish(interrupted=True)
            raise
    except BaseException:
        tuner.finish(interrupted=True)
        raise
    finally:
        hooks.remove_observer(tuner.observe)
    tuner.finish()
    return status


def _usage_error(message: str) -> int:
    print(f"{USAGE}\npython -m attnpatch tune: error: {message}", file=sys.stderr)
    return 2
