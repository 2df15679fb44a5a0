"""The routing report: counts that match the model's real attention calls, fallbacks with reasons, passthroughs,
the JSON schema, the exit-time table, zero cost when off, and a bad path failing at enable()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import attnpatch  # noqa: E402
from attnpatch import report  # noqa: E402
from attnpatch.core import dispatch, hooks, registry, selection  # noqa: E402
from attnpatch.errors import AttnpatchError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
needs_models = pytest.mark.skipif(
    bool(__import__("attnpatch.testing.tiny", fromlist=["missing"]).missing()),
    reason="needs diffusers and transformers",
)


@pytest.fixture(autouse=True)
def _report_off() -> Iterator[None]:
    yield
    report.disable()
    for name in ("only_fp64",):
        if name in {b.name for b in registry.list_backends()}:
            registry.unregister_backend(name)


class SdpaCounter(TorchFunctionMode):
    """Counts torch's own SDPA calls, whoever makes them: the model's real number of attention calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def qkv(batch: int = 2, seq: int = 16, heads: int = 4, dim: int = 8) -> torch.Tensor:
    return torch.randn(batch, seq, heads, dim, generator=torch.Generator().manual_seed(0))


def routed_in(site: str, spec: str, query: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    saved = selection.push_module(selection.resolve(spec), site)
    try:
        return attnpatch.dispatch_attention(query, query, query, **kwargs)
    finally:
        selection.pop_module(saved)


def test_off_costs_nothing() -> None:
    # No observer means the dispatcher keeps its fast path; enabling and disabling leaves none behind.
    assert report._observe not in hooks.observers
    report.enable()
    assert hooks.observers == [report._observe]
    report.disable()
    assert hooks.observers == []
    assert not report.enabled()


def test_sites_calls_shapes_dtypes() -> None:
    report.enable()
    q = qkv()
    attnpatch.dispatch_attention(q, q, q)
    for _ in range(3):
        routed_in("unet.down_blocks.0.attn1", "native", q)
    routed_in("unet.down_blocks.1.attn1", "native", q.double(), attn_mask=torch.ones(2, 16, dtype=torch.bool))
    data = report.snapshot()
    sites = {s["site"]: s for s in data["sites"]}
    assert list(sites) == ["<direct>", "unet.down_blocks.0.attn1", "unet.down_blocks.1.attn1"]
    assert data["totals"]["calls"] == 5
    assert sites["unet.down_blocks.0.attn1"]["calls"] == 3
    assert sites["unet.down_blocks.0.attn1"]["shapes"] == [
        {"query": [2, 16, 4, 8], "key": [2, 16, 4, 8], "mask": "none", "causal": False, "calls": 3}
    ]
    assert sites["unet.down_blocks.1.attn1"]["dtypes"] == {"float64": 1}
    assert sites["unet.down_blocks.1.attn1"]["shapes"][0]["mask"] == "key_padding"
    table = report.format_table(data)
    # numbered siblings are grouped in the table
    assert "unet.down_blocks.*.attn1" in table and "unet.down_blocks.0.attn1" not in table


def test_fallbacks_name_backend_and_reason() -> None:
    registry.register_backend("only_fp64", lambda *a: registry.get_backend("native").fn(*a), dtypes={torch.float64})
    report.enable()
    q = qkv()
    with pytest.warns(attnpatch.AttnpatchWarning, match="only_fp64"):
        routed_in("transformer.blocks.0.attn", "only_fp64,native", q)
    routed_in("transformer.blocks.0.attn", "only_fp64,native", q)
    routed_in("transformer.blocks.0.attn", "only_fp64,native", q.double())
    site = report.snapshot()["sites"][0]
    assert site["requested"] == {"only_fp64,native": 3}
    assert site["served"] == {"native": 2, "only_fp64": 1}
    assert site["fallback_calls"] == 2
    [fallback] = site["fallbacks"]
    assert fallback["backend"] == "only_fp64" and fallback["served_by"] == "native" and fallback["calls"] == 2
    assert "needs dtype float64, got float32" in fallback["reason"]
    text = report.format_table(report.snapshot())
    assert "only_fp64 -> native: needs dtype float64, got float32" in text


def test_passthrough_counted_per_site_from_enable_on() -> None:
    dispatch.note_passthrough("text_encoder.layers.0.attn", "before the report")
    report.enable()
    dispatch.note_passthrough("text_encoder.layers.0.attn", "softcap (Gemma 2)")
    dispatch.note_passthrough("text_encoder.layers.0.attn", "softcap (Gemma 2)")
    data = report.snapshot()
    [site] = data["sites"]
    assert site["site"] == "text_encoder.layers.0.attn" and site["calls"] == 0
    assert site["passthrough"] == [{"reason": "softcap (Gemma 2)", "calls": 2}]
    assert data["totals"]["passthrough_calls"] == 2
    assert "softcap (Gemma 2) (2 calls)" in report.format_table(data)


def test_timing_share_and_unwrap() -> None:
    native = registry.get_backend("native")
    original = native.fn
    report.enable(timing=True)
    assert hooks.call_timer() is not None and native.fn is original, "timing is the dispatcher's call timer"
    q = qkv()
    routed_in("a.0.attn", "native", q)
    routed_in("b.0.attn", "native", q)
    data = report.snapshot()
    assert data["timed"] is True
    shares = [s["time_share"] for s in data["sites"]]
    assert all(s is not None and s > 0 for s in shares)
    assert sum(shares) == pytest.approx(1.0)
    report.disable()
    assert hooks.call_timer() is None and native.fn is original


def test_json_schema(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    report.enable(path)
    assert not path.exists()  # probed at enable(), written at exit / write()
    q = qkv()
    routed_in("vae.decoder.mid_block.attentions.0", "native", q)
    report.write()
    data = json.loads(path.read_text())
    assert data["schema"] == "attnpatch.report/1"
    assert set(data) == {
        "schema",
        "attnpatch",
        "torch",
        "started",
        "wall_seconds",
        "timed",
        "pid",
        "parent_pid",
        "totals",
        "children",
        "sites",
    }
    assert (data["pid"], data["parent_pid"], data["children"]) == (os.getpid(), None, [])
    assert set(data["totals"]) == {"calls", "fallback_calls", "passthrough_calls", "attention_seconds"}
    [site] = data["sites"]
    assert set(site) == {
        "site",
        "calls",
        "fallback_calls",
        "requested",
        "served",
        "fallbacks",
        "shapes",
        "dtypes",
        "rules",
        "passthrough",
        "seconds",
        "time_share",
        "verify",
    }
    # the schema is documented where users look for it
    doc = (REPO / "docs" / "report.md").read_text()
    for key in [*site, *data]:
        assert f'"{key}"' in doc


def test_text_path_gets_the_table(tmp_path: Path) -> None:
    path = tmp_path / "report.txt"
    report.enable(path)
    routed_in("x.0.attn", "native", qkv())
    report.write()
    assert path.read_text().startswith("attnpatch report: 1 attention calls routed")


@pytest.mark.parametrize("bad", ["missing-folder/report.json", "."])
def test_unwritable_path_fails_at_enable(tmp_path: Path, bad: str) -> None:
    with pytest.raises(AttnpatchError, match="report"):
        report.enable(tmp_path / bad)
    assert not report.enabled()
    assert list(tmp_path.iterdir()) == []


def test_read_only_folder_fails_at_enable(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if _can_write(folder):
            pytest.skip("running as a user who can write to read-only folders (root)")
        with pytest.raises(AttnpatchError, match="cannot write the report"):
            report.enable(folder / "r.json")
    finally:
        folder.chmod(0o700)


def _can_write(folder: Path) -> bool:
    try:
        (folder / "probe").touch()
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


def test_table_and_file_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "exit.json"
    script = textwrap.dedent(
        f"""
        import torch, attnpatch
        from attnpatch import report
        report.enable({str(path)!r})
        q = torch.randn(1, 8, 2, 4)
        for _ in range(3):
            attnpatch.dispatch_attention(q, q, q)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "attnpatch report: 3 attention calls routed" in done.stderr
    assert json.loads(path.read_text())["totals"]["calls"] == 3


@needs_models
@pytest.mark.parametrize("model", ["sd", "flux", "llama"])
def test_counts_match_the_models_real_attention_calls(model: str) -> None:
    from attnpatch.cli import demo

    job = demo.workloads(steps=1, tokens=3)[model]
    built = job.build()
    counter = SdpaCounter()
    with counter:
        job.run(built)  # unpatched: every softmax attention of these models is one torch SDPA call
    assert counter.calls > 0
    report.enable()
    attnpatch.apply(built, backend="native")
    try:
        job.run(built)
    finally:
        attnpatch.unapply(built)
    data = report.snapshot()
    assert data["totals"]["calls"] == counter.calls
    assert data["totals"]["fallback_calls"] == 0
    names = [s["site"] for s in data["sites"]]
    assert "<direct>" not in names
    components = {"sd": ("unet.", "vae.", "text_encoder."), "flux": ("transformer.", "vae.", "text_encoder")}
    for prefix in components.get(model, ("model.layers.",)):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert all(s["served"] == {"native": s["calls"]} for s in data["sites"])


# --- issue 11: a report shared by processes, layers left alone ------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".txt"])
def test_child_processes_report_beside_the_parent_and_the_parent_counts_them(tmp_path: Path, suffix: str) -> None:
    from scripts.processes import SCRIPTS, python

    path = tmp_path / f"run{suffix}"
    result = python("-m", "attnpatch", "--backend", "native", f"--report={path}", str(SCRIPTS / "report_children.py"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("routed=1 served=native") == 3
    children = sorted(tmp_path.glob(f"run.*{suffix}"))
    assert len(children) == 2, "each child writes its own file, never the parent's"
    if suffix == ".json":
        parent = json.loads(path.read_text())
        assert parent["parent_pid"] is None and parent["totals"]["calls"] == 1
        assert sorted(c["file"] for c in parent["children"]) == [c.name for c in children]
        assert all(c["calls"] == 1 for c in parent["children"])
        for child in children:
            data = json.loads(child.read_text())
            assert data["parent_pid"] == parent["pid"] and child.name == f"run.{data['pid']}.json"
            assert data["totals"]["calls"] == 1 and data["children"] == []
    else:
        assert path.read_text().startswith("attnpatch report: 1 attention calls routed")
        assert all("child of pid " in c.read_text().splitlines()[0] for c in children)
    # the parent's table, printed last, says how many processes reported and their totals
    last = result.stderr[result.stderr.rindex("attnpatch report:") :]
    assert "3 processes reported: 3 attention calls routed, 0 fell back, 0 passed through in all" in last


@needs_models
def test_layers_left_alone_are_listed_with_the_right_fix() -> None:
    from diffusers.models.attention_processor import AttnProcessor

    from attnpatch import api
    from attnpatch.testing import diffusers_models as dm

    fam = dm.FAMILIES["unet"]
    unet = dm.build(fam)
    unet.set_attn_processor(AttnProcessor())  # what set_default_attn_processor() installs in diffusers 0.42
    report.enable()
    api.install("native")
    try:
        dm.run(fam, unet)
        data = report.snapshot()
    finally:
        api.uninstall()
    sites = {s["site"]: s for s in data["sites"]}
    assert len(sites) == 8 and data["totals"]["calls"] == 0
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in sites
    [reason] = {p["reason"] for s in sites.values() for p in s["passthrough"]}
    assert "AttnProcessor computes the attention probabilities itself (bmm + softmax)" in reason
    assert "pipe.unet.set_attn_processor(AttnProcessor2_0())" in reason
    from attnpatch.patchers import diffusers as patcher

    assert report.SKIPPED == patcher.SKIPPED, "the report knows the patcher's reasons for layers left alone"
    table = report.format_table(data)
    assert "attention layers left alone (not routed):" in table
    assert "(8 layers, 8 calls)" in table
    assert "passed through to the library's own attention" not in table
