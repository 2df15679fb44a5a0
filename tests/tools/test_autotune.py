"""Autotune: `auto` times its candidates and keeps the faster of two registered test backends with different
costs; the choice is cached in memory and on disk (keyed by versions and device), shown while tuning, survives
Ctrl-C, and `python -m attnpatch cache show|clear` manage it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import attnpatch  # noqa: E402
from attnpatch import autotune, cli  # noqa: E402
from attnpatch.core import hooks, registry  # noqa: E402
from attnpatch.core.call import MASK_NONE, CallSpec  # noqa: E402

SLOW, FAST = "test_slow", "test_fast"
calls: dict[str, int] = {}


def _native(*args: Any) -> torch.Tensor:
    return registry.get_backend("native").fn(*args)


def slow(*args: Any) -> torch.Tensor:
    calls[SLOW] = calls.get(SLOW, 0) + 1
    time.sleep(0.05)  # 50 ms more than the fast one: far above scheduling noise on a busy machine
    return _native(*args)


def fast(*args: Any) -> torch.Tensor:
    calls[FAST] = calls.get(FAST, 0) + 1
    return _native(*args)


@pytest.fixture(autouse=True)
def _backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("ATTNPATCH_CACHE_DIR", str(tmp_path / "cache"))
    # The slow one has the higher priority: without autotune `auto` would pick it.
    registry.register_backend(SLOW, slow, priority=100, replace=True)
    registry.register_backend(FAST, fast, priority=50, replace=True)
    calls.clear()
    yield tmp_path / "cache"
    autotune.disable()
    for name in (SLOW, FAST, "test_broken"):
        if name in {b.name for b in registry.list_backends()}:
            registry.unregister_backend(name)


def qkv(seq: int = 16) -> torch.Tensor:
    return torch.randn(2, seq, 4, 8, generator=torch.Generator().manual_seed(0))


def spec_and_args(q: torch.Tensor) -> tuple[CallSpec, tuple[Any, ...]]:
    return CallSpec.of(q, q, q, MASK_NONE, 0.0, False, None), (q, q, q, None, 0.0, False, None, False)


def test_picks_the_faster_of_two() -> None:
    autotune.enable()
    q = qkv()
    call, args = spec_and_args(q)
    chosen = autotune.choose(call, [registry.get_backend(SLOW), registry.get_backend(FAST)], args)
    assert chosen.name == FAST
    [entry] = autotune._memory.values()
    assert entry["backend"] == FAST and entry["times_ms"][SLOW] >= 50 > entry["times_ms"][FAST]


def test_auto_routes_to_the_tuned_choice(capsys: pytest.CaptureFixture[str]) -> None:
    q = qkv().double()  # float64: flex is no candidate, so no kernel compiles in this test
    attnpatch.dispatch_attention(q, q, q, backend="auto")
    assert calls.get(SLOW) == 1  # priority order without autotune
    autotune.enable()
    recorded: list[str] = []
    hooks.add_observer(lambda record: recorded.append(record.served))
    for _ in range(3):
        attnpatch.dispatch_attention(q, q, q, backend="auto")
    assert len(recorded) == 3 and SLOW not in recorded
    progress = capsys.readouterr().err
    assert progress.count("attnpatch autotune: timing") == 1  # tuned once, then cached
    assert f"-> {recorded[0]}" in progress


def test_disk_cache_is_reused_without_timing(_backends: Path) -> None:
    autotune.enable()
    q = qkv()
    call, args = spec_and_args(q)
    candidates = [registry.get_backend(SLOW), registry.get_backend(FAST)]
    autotune.choose(call, candidates, args)
    [path] = list(_backends.glob("autotune-*.json"))
    data = json.loads(path.read_text())
    assert data["schema"] == "attnpatch.autotune/1"
    assert set(data["env"]) == {"attnpatch", "torch", "device"} and data["env"]["torch"] == torch.__version__
    autotune.disable()  # drops the in-memory cache, as a new process would start
    autotune.enable()
    calls.clear()
    assert autotune.choose(call, candidates, args).name == FAST
    assert calls == {}  # nothing was timed again


def test_cache_keys_bucket_sequences_and_split_by_version(monkeypatch: pytest.MonkeyPatch) -> None:
    q17, q30, q40 = qkv(17), qkv(30), qkv(40)
    kind = [autotune.kind_of(spec_and_args(q)[0], q.shape[0]) for q in (q17, q30, q40)]
    assert kind[0] == kind[1] != kind[2]  # 17 and 30 both round up to 32, 40 to 64
    assert "cpu float32" in kind[0] and "s32x32" in kind[0] and "mask=none" in kind[0]
    device = torch.device("cpu")
    before = autotune.cache_file(device)
    monkeypatch.setattr(attnpatch, "__version__", "99.0")
    assert autotune.cache_file(device) != before


def test_rng_is_left_as_it_was() -> None:
    autotune.enable()
    q = qkv()
    call, args = spec_and_args(q)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    autotune.choose(call, [registry.get_backend(SLOW), registry.get_backend(FAST)], (*args[:4], 0.3, *args[5:]))
    assert torch.equal(torch.rand(3), expected)


def test_failing_candidate_is_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*args: Any) -> torch.Tensor:
        raise RuntimeError("kernel exploded")

    registry.register_backend("test_broken", broken, priority=200)
    autotune.enable()
    q = qkv()
    call, args = spec_and_args(q)
    chosen = autotune.choose(call, [registry.get_backend("test_broken"), registry.get_backend(FAST)], args)
    assert chosen.name == FAST
    assert "test_broken failed (RuntimeError: kernel exploded)" in capsys.readouterr().err


def test_ctrl_c_keeps_what_was_tuned(_backends: Path) -> None:
    autotune.enable()
    q = qkv()
    call, args = spec_and_args(q)
    autotune.choose(call, [registry.get_backend(SLOW), registry.get_backend(FAST)], args)

    def interrupted(*args: Any) -> torch.Tensor:
        raise KeyboardInterrupt

    registry.register_backend("test_broken", interrupted)
    big = qkv(100)
    big_call, big_args = spec_and_args(big)
    with pytest.raises(KeyboardInterrupt):
        autotune.choose(big_call, [registry.get_backend(FAST), registry.get_backend("test_broken")], big_args)
    [path] = list(_backends.glob("autotune-*.json"))
    assert list(json.loads(path.read_text())["entries"]) == [autotune.kind_of(call, 2)]


def test_unreadable_cache_is_ignored_and_rewritten(_backends: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = autotune.cache_file(torch.device("cpu"))
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    autotune.enable()
    q = qkv()
    call, args = spec_and_args(q)
    # One AttnpatchWarning (shown on stderr outside pytest), whatever the progress setting.
    with pytest.warns(attnpatch.AttnpatchWarning, match="ignoring the cache file .*JSONDecodeError"):
        assert autotune.choose(call, [registry.get_backend(SLOW), registry.get_backend(FAST)], args).name == FAST
    assert json.loads(path.read_text())["entries"]


def test_cache_command(_backends: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["cache", "show"]) == 0
    assert "autotune cache is empty" in capsys.readouterr().out
    autotune.enable(progress=False)
    q = qkv()
    call, args = spec_and_args(q)
    autotune.choose(call, [registry.get_backend(SLOW), registry.get_backend(FAST)], args)
    assert cli.main(["cache", "dir"]) == 0
    assert capsys.readouterr().out.strip() == str(_backends)
    assert cli.main(["cache", "show"]) == 0
    shown = capsys.readouterr().out
    assert f"-> {FAST}" in shown and "cpu float32 b2 h4/4 d8/8 s16x16 mask=none" in shown
    assert cli.main(["cache", "clear"]) == 0
    assert "removed 1 autotune cache file" in capsys.readouterr().out
    assert list(_backends.glob("autotune-*.json")) == []
    with pytest.raises(SystemExit):
        cli.main(["cache", "wipe"])


@pytest.mark.parametrize(
    "content",
    [
        "[" * 100_000 + "]" * 100_000,  # deeply nested JSON: RecursionError in json.loads
        '{"schema": "attnpatch.autotune/1", "entries": [1, 2]}',
        '{"schema": "attnpatch.autotune/1", "entries": {"k": {"backend": 3}, "j": {"backend": "x", "times_ms": [1]}}}',
        "not json",
    ],
    ids=["nested", "entries-list", "wrong-types", "not-json"],
)
def test_a_corrupt_cache_is_ignored_with_one_warning_and_rewritten(
    content: str, _backends: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    autotune.enable(progress=False)
    q = qkv()
    call, args = spec_and_args(q)
    path = autotune.cache_file(q.device)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(attnpatch.AttnpatchWarning, match="ignoring the cache file"):
        chosen = autotune.choose(call, [registry.get_backend(SLOW), registry.get_backend(FAST)], args)
    assert chosen.name == FAST
    data = json.loads(path.read_text())  # rewritten, well formed
    assert data["schema"] == autotune.SCHEMA and all(isinstance(e["backend"], str) for e in data["entries"].values())
    assert cli.main(["cache", "show"]) == 0
    assert cli.main(["cache", "show", "--json"]) == 0


def test_cache_writes_never_follow_a_planted_symlink(_backends: Path, tmp_path: Path) -> None:
    import os

    autotune.enable(progress=False)
    q = qkv()
    call, args = spec_and_args(q)
    path = autotune.cache_file(q.device)
    path.parent.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    # The name the old writer used for its temporary file, planted as a link to another file of the user's.
    (path.parent / f".{path.name}.{os.getpid()}.tmp").symlink_to(victim)
    autotune.choose(call, [registry.get_backend(SLOW), registry.get_backend(FAST)], args)
    assert victim.read_text() == "precious"
    assert json.loads(path.read_text())["schema"] == autotune.SCHEMA


def test_the_cache_folder_is_private(_backends: Path) -> None:
    autotune.enable(progress=False)
    q = qkv()
    call, args = spec_and_args(q)
    autotune.choose(call, [registry.get_backend(SLOW), registry.get_backend(FAST)], args)
    assert (autotune.cache_file(q.device).parent.stat().st_mode & 0o777) == 0o700
