"""Build hooks that put attnpatch's interpreter-start files into the wheel (everything else is in pyproject.toml).

- ``attnpatch-startup.pth`` goes to the root of the wheel, so installing it puts the file in site-packages,
  where ``site`` runs its one line at every interpreter start (see attnpatch/startup.py). Regular wheels get it
  from ``build_py``; editable wheels (``pip install -e .``) do not run that copy, so the ``editable_wheel``
  command adds the same file next to setuptools' own ``__editable__`` one.
- ``sitecustomize/sitecustomize.py`` is copied to ``attnpatch/_sitecustomize/``, where the runner finds it in an
  installed wheel (from a checkout or an editable install it uses ``sitecustomize/`` itself).
"""

from __future__ import annotations

import os
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
PTH = "attnpatch-startup.pth"
PTH_SOURCE = os.path.join(HERE, "sitecustomize", PTH)
SITECUSTOMIZE_SOURCE = os.path.join(HERE, "sitecustomize", "sitecustomize.py")
SITECUSTOMIZE_TARGET = os.path.join("attnpatch", "_sitecustomize", "sitecustomize.py")


class BuildPyWithStartupFiles(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            for source, target in self._startup_files():
                self.mkpath(os.path.dirname(target))
                self.copy_file(source, target, preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs += [target for _, target in self._startup_files()]
        return outputs

    def _startup_files(self) -> list[tuple[str, str]]:
        return [
            (PTH_SOURCE, os.path.join(self.build_lib, PTH)),
            (SITECUSTOMIZE_SOURCE, os.path.join(self.build_lib, SITECUSTOMIZE_TARGET)),
        ]


class _PlusStartupPth:
    """Wraps the editable strategy setuptools chose (a .pth or a finder) and adds our .pth beside it."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    def __enter__(self) -> _PlusStartupPth:
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.strategy.__exit__(*exc)

    def __call__(self, wheel: Any, files: list[str], mapping: dict[str, str]) -> None:
        self.strategy(wheel, files, mapping)
        with open(PTH_SOURCE, "rb") as f:
            wheel.writestr(PTH, f.read())


class EditableWheelWithStartupPth(editable_wheel):
    # _select_strategy is setuptools' one extension point for what an editable wheel contains (v64+).
    def _select_strategy(self, name: str, tag: str, build_lib: Any) -> Any:
        return _PlusStartupPth(super()._select_strategy(name, tag, build_lib))


setup(cmdclass={"build_py": BuildPyWithStartupFiles, "editable_wheel": EditableWheelWithStartupPth})
