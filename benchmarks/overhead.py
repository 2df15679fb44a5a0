"""Dispatch overhead benchmark: ``python benchmarks/overhead.py`` (same as ``python -m attnpatch bench --overhead``)."""

import sys

from attnpatch.cli.overhead import main

if __name__ == "__main__":
    sys.exit(main())
