"""A user script for the report's process tests: the diffusers probe in a spawned child, in a subprocess, then here.

    python report_children.py          the three probes, each process printing its probe line
    python report_children.py child    one probe (what the children run)

The children exit normally (a joined Process, a finished subprocess), as their reports are written at exit.
"""

import multiprocessing
import subprocess
import sys

from probe import run_probe


def child() -> None:
    print(run_probe(), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["child"]:
        child()
    else:
        process = multiprocessing.get_context("spawn").Process(target=child)
        process.start()
        process.join()
        subprocess.run([sys.executable, __file__, "child"], check=True)
        print(run_probe(), flush=True)
