"""Interpreter start with attnpatch installed: ``python benchmarks/startup.py [--rounds N] [--editable]``.

Builds two throwaway venvs from the same base Python, identical but for attnpatch (installed from this checkout,
``--no-deps``: the startup path imports neither torch nor wrapt), and times ``python -c pass`` in them side by
side, interleaved round by round in a shuffled order, so load on the machine hits every variant alike:

- ``without``: the venv without attnpatch, ATTNPATCH_BACKEND unset (the baseline);
- ``installed``: attnpatch installed (its ``attnpatch-startup.pth`` line runs), ATTNPATCH_BACKEND unset;
- ``variable set``: attnpatch installed, ATTNPATCH_BACKEND=flash, no diffusers/transformers imported: the cost of
  reading the settings and installing the import hook that waits for them.

Reports the minimum and median CPU time and wall time per start (on a loaded machine CPU time and minima are the
stable numbers), and, from ``-X importtime``, what the variable-set start imports. ``--editable`` installs with
``pip install -e`` instead (setuptools' own editable finder .pth then adds its pathlib import to every start).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_venvs(where: Path, editable: bool) -> tuple[str, str]:
    pythons = []
    for name in ("without", "with"):
        venv.EnvBuilder(with_pip=False, symlinks=True).create(where / name)
        pythons.append(str(where / name / "bin" / "python"))
    install = ["install", "-q", "--no-deps", *(["-e"] if editable else []), str(ROOT)]
    had_build = (ROOT / "build").exists()
    subprocess.run([sys.executable, "-m", "pip", "--python", pythons[1], *install], check=True)
    if not had_build:  # pip builds a regular install in the checkout: leave no stale build/lib behind
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    return pythons[0], pythons[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTNPATCH_", "PYTHON"))}
    env.update(extra)
    return env


def start_time(python: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ``python -c pass``. CPU time (user + system, from the child's rusage)
    is what a start costs; on a loaded machine it also swings far less than wall time, which includes waiting."""
    t0 = time.perf_counter()
    child = subprocess.Popen([python, "-c", "pass"], env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"{python} -c pass exited with {child.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def imported_by_startup(python: str, env: dict[str, str]) -> list[tuple[str, int]]:
    """(module, cumulative microseconds) of the attnpatch modules ``-X importtime`` reports for ``python -c pass``."""
    result = subprocess.run([python, "-X", "importtime", "-c", "pass"], env=env, capture_output=True, text=True)
    rows = []
    for line in result.stderr.splitlines():
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[2].split(".")[0] == "attnpatch" and parts[1].isdigit():
            rows.append((parts[2], int(parts[1])))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100, help="interleaved rounds (default 100)")
    parser.add_argument("--editable", action="store_true", help="pip install -e instead of a regular install")
    parser.add_argument("--keep", type=Path, help="build the venvs here and keep them (default: a temp dir)")
    opts = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        where = opts.keep or Path(tmp)
        without, with_attnpatch = make_venvs(where, opts.editable)
        variants = {
            "without attnpatch": (without, clean_env()),
            "installed, variable unset": (with_attnpatch, clean_env()),
            "installed, ATTNPATCH_BACKEND=flash": (with_attnpatch, clean_env(ATTNPATCH_BACKEND="flash")),
        }
        for python, env in variants.values():  # warm the file cache and the .pyc files
            for _ in range(3):
                start_time(python, env)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        order = list(variants)
        for _ in range(opts.rounds):
            random.shuffle(order)
            for name in order:
                times[name].append(start_time(*variants[name]))
        imports = imported_by_startup(with_attnpatch, clean_env(ATTNPATCH_BACKEND="flash"))

    install = "pip install -e" if opts.editable else "pip install"
    print(
        f"`python -c pass`, {opts.rounds} interleaved rounds, Python {sys.version.split()[0]}, attnpatch via {install}"
    )
    print(f"{'variant':<36} {'':>4} {'min ms':>8} {'median ms':>10} {'min vs without':>15} {'median vs without':>18}")
    for column, label in ((1, "CPU"), (0, "wall")):
        base = [sample[column] for sample in times["without attnpatch"]]
        for name, samples in times.items():
            values = [sample[column] for sample in samples]
            low, mid = min(values), statistics.median(values)
            print(
                f"{name:<36} {label:>4} {low * 1e3:8.2f} {mid * 1e3:10.2f} {(low - min(base)) * 1e3:+15.2f} "
                f"{(mid - statistics.median(base)) * 1e3:+18.2f}"
            )
    if imports:
        listed = ", ".join(f"{module} {us / 1e3:.1f} ms" for module, us in imports)
        print(f"imported at start with the variable set (-X importtime, cumulative): {listed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
