"""The README's Quickstart is what CI runs: exactly two commands, and .ci/run calls the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```\n(.*?)```", section, flags=re.S)]


def test_quickstart_has_exactly_two_commands_pinning_torch() -> None:
    commands = quickstart_commands()
    assert len(commands) == 2
    for command in commands:
        assert "\n" not in command
        assert "torch==2.13.0" in command  # an unpinned torch would pull gigabytes of CUDA packages
    assert "attnpatch demo" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command() -> None:
    assert quickstart_commands()[1] in (ROOT / ".ci" / "run").read_text()
