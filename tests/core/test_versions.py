"""Version comparisons for the kernel libraries' minimum versions: pip's order for releases and pre-releases."""

from __future__ import annotations

import itertools

import pytest

from attnpatch.backends import _probe
from attnpatch.core.versions import is_prerelease, older_than, version_tuple


@pytest.mark.parametrize(
    ("version", "release", "pre"),
    [
        ("2.8.3.post1+cu12", (2, 8, 3), False),
        ("2.2.0rc1", (2, 2, 0), True),  # was (2, 2, 1): the digits of "0rc1" were read as one number
        ("4.0.0b40", (4, 0, 0), True),  # was (4, 0, 40)
        ("0.36.0.dev0", (0, 36, 0), True),
        ("1.0rc1", (1, 0), True),  # was (1, 1)
        ("0.0.35", (0, 0, 35), False),
        ("2.13.0+cpu", (2, 13, 0), False),
    ],
)
def test_version_tuple_reads_the_release(version: str, release: tuple[int, ...], pre: bool) -> None:
    assert version_tuple(version) == release
    assert is_prerelease(version) is pre


@pytest.mark.parametrize(
    ("version", "minimum", "older"),
    [
        ("2.2.0rc1", "2.2.0", True),  # a release candidate of the minimum is not the minimum
        ("2.2.0rc1", "2.2", True),
        ("2.2.0", "2.2", False),
        ("2.2.0.post1", "2.2.0", False),
        ("2.1.9", "2.2.0", True),
        ("2.3.0b1", "2.2.0", False),
        ("0.1.5.dev0", "0.1.5.dev0", False),
        ("1.0.5", "1.0.6", True),
        ("2.8.3.post1+cu12", "2.8.3", False),
    ],
)
def test_older_than_orders_pre_releases_before_their_release(version: str, minimum: str, older: bool) -> None:
    assert older_than(version, minimum) is older


def test_older_than_follows_pips_order_between_pre_releases() -> None:
    # Each is older than the next (PEP 440): two pre-releases of one release were equal before (b3 == b5).
    order = ["1.0.dev1", "1.0a1.dev1", "1.0a1", "1.0a1.post1", "1.0b1", "1.0b3", "1.0b40", "1.0rc1", "1.0"]
    order += ["1.0.post1.dev1", "1.0.post1", "1.0.1"]
    for older, newer in itertools.pairwise(order):
        assert older_than(older, newer) and not older_than(newer, older), (older, newer)
    assert not any(older_than(v, v) for v in order)
    assert older_than("1.0-RC.1", "1.0rc2")  # other spellings of the same parts
    assert not older_than("1.0.weird", "1.0")  # unreadable after the release: read as the release


def test_a_release_candidate_of_the_minimum_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The too-old reason of a kernel package, as _probe gives it from the installed version.
    monkeypatch.setattr(_probe, "installed", lambda module: True)
    monkeypatch.setattr(_probe, "installed_version", lambda module, distribution: "2.2.0rc1")
    reasons = _probe.package_reasons("sageattention", "sageattention", min_version="2.2.0")
    assert reasons and "2.2.0rc1 < 2.2.0" in reasons[0]
    monkeypatch.setattr(_probe, "installed_version", lambda module, distribution: "2.2.0")
    assert _probe.package_reasons("sageattention", "sageattention", min_version="2.2.0") == []
