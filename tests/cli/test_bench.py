"""`python -m attnpatch bench`: JSON schema, presets scaled for a CPU, custom shapes, bad input, Ctrl-C."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from attnpatch import cli  # noqa: E402
from attnpatch.cli import bench  # noqa: E402
from attnpatch.core import registry  # noqa: E402

RESULT_KEYS = {
    "preset",
    "case",
    "batch",
    "seq_q",
    "seq_kv",
    "heads_q",
    "heads_kv",
    "head_dim",
    "causal",
    "scaled_from",
    "flops",
    "backend",
    "status",
    "reasons",
    "median_ms",
    "min_ms",
    "runs",
    "tflops",
    "peak_mem_mb",
    "max_abs_err",
    "tolerance",
    "within_tolerance",
    "overhead_us",
}
FAST = ["--runs", "2", "--warmup", "1", "--no-progress"]


def run_json(tmp_path: Path, *args: str) -> dict[str, Any]:
    path = tmp_path / "bench.json"
    assert cli.main(["bench", *args, *FAST, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_json_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry.register_backend("test_cuda_only", lambda *a: a[0], devices={"cuda"})
    try:
        data = run_json(
            tmp_path,
            "--shape",
            "2,32,4,16",
            "--shape",
            "1,8,4,16,2,24",
            "--causal",
            "--backends",
            "native,_native_math,test_cuda_only",
        )
    finally:
        registry.unregister_backend("test_cuda_only")
    assert data["schema"] == "attnpatch.bench/1"
    assert set(data) == {
        "schema",
        "attnpatch",
        "torch",
        "device",
        "dtype",
        "settings",
        "interrupted",
        "left_out",
        "results",
    }
    assert data["dtype"] == "float32" and data["interrupted"] is False
    assert data["settings"] == {"warmup": 1, "runs": 2, "max_seq": bench.CPU_MAX_SEQ, "check": True}
    results = data["results"]
    assert len(results) == 6 and all(set(r) == RESULT_KEYS for r in results)
    by = {(r["case"], r["backend"]): r for r in results}
    native = by[("2,32,4,16", "native")]
    assert native["status"] == "ok" and native["runs"] == 2 and native["causal"] is True
    assert native["median_ms"] >= native["min_ms"] > 0 and native["tflops"] > 0
    assert native["within_tolerance"] is True and native["max_abs_err"] < 1e-4
    assert native["overhead_us"] >= 0 and native["peak_mem_mb"] is None  # CPU: no CUDA memory stats
    assert native["flops"] == 4 * 2 * 4 * 16 * (32 * 33 // 2)  # causal: query i sees i + 1 keys
    gqa = by[("1,8,4,16,2,24", "_native_math")]
    assert (gqa["heads_kv"], gqa["seq_kv"], gqa["status"]) == (2, 24, "ok")
    skipped = by[("2,32,4,16", "test_cuda_only")]
    assert skipped["status"] == "skipped" and skipped["reasons"] == ["runs on cuda, got tensors on cpu"]
    assert skipped["median_ms"] is None
    table = capsys.readouterr().out
    assert "test_cuda_only: runs on cuda, got tensors on cpu" in table


def test_presets_are_capped_on_cpu() -> None:
    [case] = bench.select_cases(["flux-1024"], [], False, 256)
    assert (case.seq_q, case.seq_kv, case.heads_q, case.head_dim) == (256, 256, 24, 128)
    assert case.scaled_from == (4608, 4608)
    [decode] = bench.select_cases(["llama-decode"], [], False, 256)
    assert (decode.batch, decode.seq_q, decode.seq_kv, decode.heads_q, decode.heads_kv) == (8, 1, 256, 32, 8)
    [full] = bench.select_cases(["flux-1024"], [], False, None)
    assert full.seq_q == 4608 and full.scaled_from is None
    assert {c.preset for c in bench.select_cases(list(bench.PRESETS), [], False, None)} == set(bench.PRESETS)
    assert set(bench.PRESETS) == {"sd15", "sdxl", "flux-1024", "wan", "llama-prefill", "llama-decode"}


def test_preset_run_marks_scaled_shapes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(tmp_path, "--preset", "llama-decode", "--max-seq", "64", "--backends", "native")
    [row] = data["results"]
    assert row["status"] == "ok" and row["scaled_from"] == [1, 4096] and row["seq_kv"] == 64
    assert "capped for a CPU run" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "sd3"], "unknown preset 'sd3': valid presets are"),
        (["--shape", "1,2"], "invalid shape '1,2': expected B,S,H,D[,Hkv[,Skv]]"),
        (["--shape", "1,16,4,32,3"], "heads 4 is not a multiple of key/value heads 3"),
        (["--shape", "a,b,c,d"], "Or a preset: sd15, sdxl, flux-1024"),
        (["--backends", "nope"], "unknown attention backend 'nope'"),
        (["--json", "no/such/folder/out.json"], "cannot write the results to"),
    ],
)
def test_bad_input_names_presets_and_syntax(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", *args, *FAST]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "preset" in message:
        assert "llama-decode" in err and "B,S,H,D[,Hkv[,Skv]]" in err


def test_json_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--shape", "1,8,2,8", "--backends", "native", *FAST, "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["results"][0]["status"] == "ok"


def test_ctrl_c_keeps_what_was_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = bench.run_case
    seen: list[Any] = []

    def interrupt_second(case: Any, *args: Any) -> None:
        seen.append(case)
        if len(seen) == 2:
            raise KeyboardInterrupt
        original(case, *args)

    monkeypatch.setattr(bench, "run_case", interrupt_second)
    path = tmp_path / "partial.json"
    status = cli.main(
        ["bench", "--shape", "1,8,2,8", "--shape", "1,16,2,8", "--backends", "native", *FAST, "--json", str(path)]
    )
    assert status == 130
    data = json.loads(path.read_text())
    assert data["interrupted"] is True
    assert [r["case"] for r in data["results"]] == ["1,8,2,8"] and data["results"][0]["status"] == "ok"


def test_failing_backend_is_an_error_row_not_a_crash(tmp_path: Path) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("kernel exploded")

    registry.register_backend("test_broken", broken)
    try:
        data = run_json(tmp_path, "--shape", "1,8,2,8", "--backends", "test_broken,native")
    finally:
        registry.unregister_backend("test_broken")
    status = {r["backend"]: (r["status"], r["reasons"]) for r in data["results"]}
    assert status == {"test_broken": ("error", ["RuntimeError: kernel exploded"]), "native": ("ok", [])}


def test_error_above_tolerance_is_flagged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry.register_backend("test_sloppy", lambda q, *a: registry.get_backend("native").fn(q.round(), *a))
    try:
        data = run_json(tmp_path, "--shape", "1,8,2,8", "--backends", "test_sloppy")
    finally:
        registry.unregister_backend("test_sloppy")
    assert data["results"][0]["within_tolerance"] is False
    assert "above the backend's tolerance" in capsys.readouterr().out


def test_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bench.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit):
            cli.main(["bench", "--shape", "1,8,2,8", *FAST, "--plot", str(path)])
        assert "pip install 'attnpatch[plot]'" in capsys.readouterr().err
        return
    assert cli.main(["bench", "--shape", "1,8,2,8", "--backends", "native", *FAST, "--plot", str(path)]) == 0
    assert path.stat().st_size > 0


def test_dispatch_overhead_is_small_for_native() -> None:
    q = torch.randn(1, 16, 2, 32)
    overhead = bench.dispatch_overhead(registry.get_backend("native"), (q, q, q, None, 0.0, False, None, False))
    assert 0 <= overhead < 50  # microseconds; the dispatcher's own budget is ~1 us, this only guards the method


def test_all_means_every_available_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(tmp_path, "--shape", "1,8,2,8")
    measured = {r["backend"] for r in data["results"]}
    available = {b.name for b in registry.list_backends() if b.available}
    assert "native" in measured and measured <= available
    assert set(data["left_out"]) | measured == {b.name for b in registry.list_backends()}
    if data["device"].startswith("cpu") and "flex" in available:
        assert "flex" in data["left_out"] and "flex" not in measured
    out = capsys.readouterr().out
    unavailable = [b.name for b in registry.list_backends() if not b.available]
    if unavailable:
        assert "not available here: " in out and "python -m attnpatch list says why" in out


def test_ctrl_c_inside_a_measurement_leaves_no_half_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    registry.register_backend("test_interrupted", interrupted)
    path = tmp_path / "partial.json"
    try:
        status = cli.main(
            ["bench", "--shape", "1,8,2,8", "--backends", "native,test_interrupted", *FAST, "--json", str(path)]
        )
    finally:
        registry.unregister_backend("test_interrupted")
    assert status == 130
    rows = json.loads(path.read_text())["results"]
    assert [(r["backend"], r["status"]) for r in rows] == [("native", "ok")]
    assert "INTERRUPTED" in capsys.readouterr().out


def test_list_into_a_closed_pipe_ends_quietly() -> None:
    # `python -m attnpatch list | head -1`: no BrokenPipeError traceback, status 0.
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-m", "attnpatch", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader is gone before the first line is written
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=120) == 0, stderr
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr, stderr


def test_overhead_measures_every_path_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "overhead.json"
    assert cli.main(["bench", "--overhead", "--rounds", "2", "--calls", "5", "--json", str(path)]) == 0
    results = json.loads(path.read_text())["results"]
    expected = {
        "no mask (fast path)",
        "key-padding mask (batch, seq_kv)",
        "4-D bool mask",
        "additive mask",
        "auto (after its first call)",
        "fallback chain (after its warning)",
        "context selection",
        "per-module: diffusers AttnProcessor2_0",
        "per-module: transformers LlamaAttention (sdpa)",
    }
    assert set(results) == expected
    for row in results.values():
        assert row["direct_us"] > 0 and row["routed_us"] > 0 and row["target_us"] in (0.3, 1.0)
    assert "target < 0.3 us" in capsys.readouterr().out


def test_plot_legend_keeps_underscored_backends() -> None:
    # matplotlib drops legend labels that start with "_": _native_cudnn and _flash_3 vanished from --plot.
    assert not bench.legend_label("_flash_3").startswith("_")
    assert bench.legend_label("_flash_3").strip("\u200b") == "_flash_3"
    assert bench.legend_label("flash") == "flash"
