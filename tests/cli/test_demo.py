"""`python -m attnpatch demo` end to end (fast mode): tiny SD, Flux and Llama under each backend, the table,
the images, and native matching the unpatched models exactly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
from attnpatch import cli
from attnpatch.cli import demo
from attnpatch.testing import tiny

pytestmark = pytest.mark.skipif(bool(tiny.missing()), reason="needs diffusers and transformers")


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "attnpatch-demo"  # the default --out, relative to the working directory
    began = time.perf_counter()
    assert cli.main(["demo", "--fast", "--backends", "native,_native_math"]) == 0
    assert time.perf_counter() - began < 60
    table = capsys.readouterr().out
    for model in demo.MODELS:
        assert f"{model}  " in table
    summary = json.loads((out / "demo.json").read_text())
    rows = {(r["model"], r["backend"]): r for r in summary["rows"]}
    assert set(rows) == {(m, b) for m in demo.MODELS for b in (demo.UNPATCHED, "native", "_native_math")}
    for model in demo.MODELS:
        native, math = rows[(model, "native")], rows[(model, "_native_math")]
        assert native["attention_calls"] > 0 and native["attention_calls"] == math["attention_calls"]
        assert native["served"] == {"native": native["attention_calls"]}
        assert math["served"] == {"_native_math": math["attention_calls"]}
        assert native["max_diff_vs_native"] == 0.0
        assert 0 <= math["max_diff_vs_native"] < 1e-4
    # routing through attnpatch's native changes nothing for the diffusion models
    assert rows[("sd", demo.UNPATCHED)]["max_diff_vs_native"] == 0.0
    assert rows[("flux", demo.UNPATCHED)]["max_diff_vs_native"] == 0.0
    assert "same tokens" in rows[("llama", "_native_math")]["note"]
    images = {p.name for p in out.glob("*.png")}
    assert {"sd-native.png", "flux-native.png", "sd-_native_math.png"} <= images
    from PIL import Image

    assert Image.open(out / "sd-native.png").size == (128, 128)


def test_default_backends_are_the_available_ones_native_first() -> None:
    from attnpatch.core import registry

    chosen, left_out = demo.choose_backends(None)
    assert chosen[0] == "native"
    available = {b.name for b in registry.list_backends() if b.available}
    assert set(chosen) | set(left_out) == available
    assert "flex" in left_out and "--backends" in left_out["flex"]


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--backends", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown attention backend 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--models", "sd,gpt", "--out", str(tmp_path)])


def test_a_subset_reports_only_what_it_ran(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "flux-native.png").write_bytes(b"an image of an earlier run")
    assert cli.main(["demo", "--fast", "--models", "sd", "--backends", "native", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "Llama" not in printed.out and "flux" not in printed.out
    summary = json.loads((out / "demo.json").read_text())
    assert summary["images"] == ["sd-native.png", "sd-unpatched.png"], "this run's images, not the folder's"
    assert f"({len(summary['images'])} images)" in printed.out + printed.err
