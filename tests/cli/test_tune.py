"""``python -m attnpatch tune``: its options, a plan written for real tiny SD and Flux pipelines (a backend the
script registers measured too, a lossy one kept out by the budget), Ctrl-C keeping what was measured, and the plan
applied with ``--plan`` and ``ATTNPATCH_PLAN`` (report rows name the rule; a bad plan is one line, never a crash)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripts.processes import ROOT, attnpatch_lines, python

from attnpatch.cli import run
from attnpatch.cli.tune import parse

pytest.importorskip("diffusers")

SITECUSTOMIZE = ROOT / "sitecustomize"

# A user script: registers two backends (one exact, one that rounds q and k to 3 bits), then runs the demo's tiny
# Stable Diffusion and Flux pipelines for 2 steps each. "interrupt" raises KeyboardInterrupt after Stable Diffusion.
SCRIPT = """
import sys
import torch
import attnpatch
from attnpatch.core import registry
from attnpatch.cli.demo import workloads

native = registry.get_backend("native").fn

def script_exact(q, k, v, *rest):
    return native(q, k, v, *rest)

def script_int3(q, k, v, *rest):
    def rounded(t):
        scale = t.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6) / 3
        return (t / scale).round() * scale
    return native(rounded(q), rounded(k), v, *rest)

attnpatch.register_backend("script_exact", script_exact)
attnpatch.register_backend("script_int3", script_int3, lossy=True)
jobs = workloads(steps=2)
for name in ("sd", "flux"):
    jobs[name].run(jobs[name].build())
    if "interrupt" in sys.argv:
        raise KeyboardInterrupt
print("script done")
"""
CANDIDATES = "native,_native_math,script_exact,script_int3"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    folder = tmp_path_factory.mktemp("tune")
    (folder / "models.py").write_text(SCRIPT)
    result = python(
        "-m", "attnpatch", "tune", "models.py", "--candidates", CANDIDATES, "--budget", "1e-3", "--out", "plan.json",
        cwd=folder,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "script done\n"
    return folder, json.loads((folder / "plan.json").read_text()), result.stderr


@pytest.mark.parametrize(
    ("argv", "target", "args", "out", "budget"),
    [
        (["s.py", "a", "--budget", "0.1", "--out", "p.json"], "s.py", ["a"], "p.json", 0.1),
        (["--out=q.json", "s.py", "--out", "mine.png"], "s.py", ["--out", "mine.png"], "q.json", 0.01),
        (["s.py", "--", "--budget", "1"], "s.py", ["--", "--budget", "1"], "plan.json", 0.01),
        (["--", "s.py", "--budget", "1"], "s.py", ["--budget", "1"], "plan.json", 0.01),
    ],
)
def test_options_before_the_script_and_the_first_of_each_after_it(argv, target, args, out, budget) -> None:
    opts = parse(argv)
    assert (opts.target, opts.args, opts.out, opts.budget) == (target, args, out, budget)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget", "abc", "s.py"], "--budget 'abc' is not a number >= 0"),
        (["--metric", "l2", "s.py"], "--metric 'l2' is not max_abs or rel"),
        (["--candidates", ",", "s.py"], "--candidates ',' names no backend"),
        (["--bogus", "s.py"], "unknown tune option '--bogus'"),
    ],
)
def test_bad_options_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(run.UsageError, match=message):
        parse(argv)


def test_bad_options_exit_2_before_the_script(tmp_path: Path) -> None:
    (tmp_path / "s.py").write_text("print('the script ran')")
    result = python("-m", "attnpatch", "tune", "--budget", "-1", "s.py", cwd=tmp_path)
    assert result.returncode == 2 and "the script ran" not in result.stdout
    assert result.stderr.splitlines()[-1] == (
        "python -m attnpatch tune: error: --budget '-1' is not a number >= 0: give the largest error, e.g. 1e-2"
    )
    result = python("-m", "attnpatch", "tune", "missing.py", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "No file to run: 'missing.py'\n")


def test_tune_writes_a_plan_for_every_layer_with_every_candidate_measured(tuned) -> None:
    _, plan, stderr = tuned
    assert plan["schema"] == "attnpatch.plan/1"
    assert set(plan["env"]) == {"attnpatch", "torch", "device", "diffusers", "transformers"}
    assert plan["env"]["device"].startswith("cpu")
    assert (plan["budget"], plan["metric"]) == (1e-3, "max_abs")
    components = {rule["match"].split(".")[0] for rule in plan["rules"]}
    assert components == {"text_encoder", "text_encoder_2", "unet", "vae", "transformer"}
    for rule in plan["rules"]:
        assert rule["steps"] is None
        measured = rule["measured"]
        assert set(measured) == {"native", "_native_math", "script_exact", "script_int3"}, rule["match"]
        for name, m in measured.items():
            assert m["seconds"] > 0 and m["calls"] >= 1, (rule["match"], name)
        # The 3-bit backend is far outside the budget and never chosen, however fast it ran.
        assert measured["script_int3"]["max_abs_err"] > 1e-3
        assert not measured["script_int3"]["within_tolerance"]
        assert rule["backend"] in {"native", "_native_math", "script_exact"}
        assert measured[rule["backend"]]["max_abs_err"] <= 1e-3
        # Fastest within the budget: no exact candidate measured faster than the chosen one.
        exact = {n: m["seconds"] for n, m in measured.items() if m["max_abs_err"] <= 1e-3}
        assert measured[rule["backend"]]["seconds"] == min(exact.values())
    # Layers that differ only by their numbers and chose alike are one rule.
    assert any("*" in rule["match"] for rule in plan["rules"]) or len(plan["rules"]) >= 13
    assert "attnpatch tune: unet.mid_block.attentions.0.transformer_blocks.0.attn1 [cpu float32" in stderr
    assert stderr.rstrip().endswith("plan.json")


def test_the_tuned_plan_runs_under_the_runner_and_the_report_names_its_rules(tuned) -> None:
    folder, plan, _ = tuned
    result = python("-m", "attnpatch", "--plan", "plan.json", "--report=run.json", "models.py", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "script done\n"
    report = json.loads((folder / "run.json").read_text())
    labels = {f"rule {i}: {rule['match']}": rule["backend"] for i, rule in enumerate(plan["rules"], 1)}
    for site in report["sites"]:
        assert site["rules"], site["site"]
        for label in site["rules"]:
            assert set(site["served"]) == {labels[label]}, site["site"]
    assert report["totals"]["fallback_calls"] == 0
    assert " rule" in result.stderr.splitlines()[1]


def test_attnpatch_plan_alone_activates_and_a_bad_plan_is_one_line(tuned, tmp_path: Path) -> None:
    folder, _, _ = tuned
    variables = {"PYTHONPATH": str(SITECUSTOMIZE), "ATTNPATCH_PLAN": "plan.json", "ATTNPATCH_REPORT": "env.json"}
    result = python("models.py", env=variables, cwd=folder)
    assert result.returncode == 0, result.stderr
    report = json.loads((folder / "env.json").read_text())
    assert report["sites"] and all(site["rules"] for site in report["sites"])

    (tmp_path / "bad.json").write_text(json.dumps({"schema": "attnpatch.plan/1", "rules": [{"match": "unet"}]}))
    (tmp_path / "s.py").write_text("import diffusers\nprint('the script ran')")
    variables = {"PYTHONPATH": str(SITECUSTOMIZE), "ATTNPATCH_PLAN": str(tmp_path / "bad.json")}
    result = python("s.py", env=variables, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "the script ran\n")
    lines = attnpatch_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "ATTNPATCH_PLAN=" in lines[0] and "rule 1 ('unet'): backend None is not a backend name" in lines[0]
    assert lines[0].endswith("ATTNPATCH_PLAN is ignored")


def test_the_runner_refuses_a_bad_plan_before_the_script(tmp_path: Path) -> None:
    (tmp_path / "s.py").write_text("print('the script ran')")
    (tmp_path / "bad.json").write_text(
        json.dumps({"schema": "attnpatch.plan/1", "rules": [{"match": "unet", "backend": "native", "steps": "1-2"}]})
    )
    result = python("-m", "attnpatch", "--plan", "bad.json", "s.py", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith("python -m attnpatch: error: --plan=")
    assert "rule 1 ('unet'): steps '1-2' is not 'start:stop' or null" in last


def test_ctrl_c_keeps_what_was_measured(tmp_path: Path) -> None:
    (tmp_path / "models.py").write_text(SCRIPT)
    result = python(
        "-m", "attnpatch", "tune", "--candidates", "native,_native_math", "models.py", "interrupt", cwd=tmp_path
    )  # fmt: skip
    assert result.returncode == 130, result.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {rule["match"].split(".")[0] for rule in plan["rules"]} == {"text_encoder", "unet", "vae"}
    assert "attnpatch tune: interrupted; " in result.stderr
