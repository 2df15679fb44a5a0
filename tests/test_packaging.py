"""The extras of pyproject.toml install what attnpatch uses, from PyPI, without replacing the user's torch.

Facts from pip dry runs beside torch 2.13.0 (docs/kernel-facts.md, "Extras on torch 2.13"): PyPI's ``aiter`` is an
unrelated async-iterator library (AMD's is ``amd-aiter``); ``amd-aiter`` and ``flash-attn-4`` exist as pre-releases
only, which pip takes without ``--pre`` only when the specifier names a pre-release (``amd-aiter>=0.1.5`` finds
nothing); ``torch-npu`` pins torch to its own release, so an unpinned one replaces torch; ``torch-xla`` declares no
torch yet runs only with its own release; ``sageattention`` is 1.0.6 at most on PyPI; flash-attn needs
``--no-build-isolation``, which an extra cannot pass. The libraries without an extra have their commands in the
README.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Every distribution an extra may name: the real PyPI names of what attnpatch uses. A new one is added here on
# purpose, after checking it installs beside torch 2.13 and keeps it.
DISTRIBUTIONS = {
    "diffusers",
    "transformers",
    "flash-attn-4",  # FlashAttention-4, module flash_attn.cute
    "sageattention",
    "triton",
    "xformers",
    "amd-aiter",  # AMD's AITER, module aiter
    "kernels",
    "matplotlib",
    "pytest",
    "sentencepiece",
    "protobuf",
    "attnpatch",
    "ruff",
    "mypy",
}
NEVER = {
    "aiter": "PyPI's aiter is an async-iterator library; AMD's AITER is amd-aiter",
    "torch": "an extra must not install or replace torch",
    "flash-attn": "it needs --no-build-isolation, which an extra cannot pass: README command instead",
}
# Must match the installed torch release, which an extra cannot know: pinned exactly or not named at all.
TORCH_BOUND = {"torch-npu", "torch-xla"}
PRERELEASE_ONLY = {"amd-aiter", "flash-attn-4"}
REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(?P<spec>[^;]*)(;(?P<marker>.*))?$"
)


def _parse_simply(text: str) -> dict[str, list[str]]:
    """The extras table without tomllib (Python 3.10): one ``name = [...]`` line of strings per extra."""
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = {}
    for line in section.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            extras[key.strip()] = ast.literal_eval(value.strip())
    return extras


def _extras(text: str) -> dict[str, list[str]]:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:
        return _parse_simply(text)
    extras: dict[str, list[str]] = tomllib.loads(text)["project"]["optional-dependencies"]
    return extras


PYPROJECT = (ROOT / "pyproject.toml").read_text()
EXTRAS = _extras(PYPROJECT)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> list[tuple[str, str, str, str]]:
    """(extra, requirement, canonical name, version specifier) for every requirement of every extra."""
    found = []
    for extra, requirements in EXTRAS.items():
        for requirement in requirements:
            match = REQUIREMENT.match(requirement)
            assert match, f"[{extra}] {requirement!r} is not a requirement"
            found.append((extra, requirement, _canonical(match["name"]), match["spec"].strip()))
    return found


def test_the_fallback_parser_reads_what_tomllib_reads() -> None:
    assert _parse_simply(PYPROJECT) == EXTRAS


def test_every_extra_names_real_distributions() -> None:
    for extra, requirement, name, _ in _requirements():
        assert name not in NEVER, f"[{extra}] {requirement}: {NEVER[name]}"
        if name in TORCH_BOUND:
            continue  # checked below
        assert name in DISTRIBUTIONS, f"[{extra}] {requirement}: {name} is not a distribution attnpatch uses"


def test_torch_bound_packages_are_pinned_or_absent() -> None:
    for extra, requirement, name, spec in _requirements():
        if name in TORCH_BOUND:
            assert spec.startswith("==") and "," not in spec, f"[{extra}] {requirement} would pick its own torch"


def test_prerelease_only_packages_name_a_prerelease() -> None:
    """`pip install 'amd-aiter>=0.1.5'` finds nothing (its only release is 0.1.7.post2.dev18); '>=0.1.5.dev0' does."""
    named = {name for _, _, name, _ in _requirements()}
    assert named >= PRERELEASE_ONLY, "AMD's AITER and FlashAttention-4 have extras"
    for extra, requirement, name, spec in _requirements():
        if name in PRERELEASE_ONLY:
            assert re.search(r"\d(a|b|rc|\.dev)\d+", spec), f"[{extra}] {requirement}: pip would need --pre"


def test_sageattention_asks_for_what_pypi_has() -> None:
    """PyPI has sageattention 1.0.6 at most: '>=2.1.1' made `pip install attnpatch[sage]` unresolvable."""
    (spec,) = [spec for _, _, name, spec in _requirements() if name == "sageattention"]
    minimum = re.match(r">=\s*(\d+)", spec)
    assert minimum is not None and int(minimum[1]) < 2, spec


def test_the_readme_gives_the_commands_of_the_libraries_without_an_extra() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Installing the kernel libraries", 1)[1].split("\n## ", 1)[0]
    for command in (
        "pip install flash-attn --no-build-isolation",
        "cd flash-attention/hopper && python setup.py install",
        "pip install 'torch-npu==",
        "'torch-xla[tpu]==",
        "pip install 'attnpatch[flash4]'",
        "pip install 'attnpatch[aiter]'",
        "pip install 'attnpatch[sage]'",
        "pip install 'attnpatch[xformers]'",
        "pip install 'attnpatch[hub]'",
    ):
        assert command in section, command
    for extra in re.findall(r"attnpatch\[(\w+)\]", section):
        assert extra in EXTRAS, f"the README names the extra [{extra}], which pyproject.toml does not have"
