"""Attention plans on the real tiny pipelines: a plan file is checked with one-line errors, applied per layer and
per denoising step (the count restarts at each pipeline call; negative bounds count from the pipeline's number of
steps, or from ``steps=`` for a bare model), shown in the report, verified alongside, and unapplied without a trace."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import attnpatch  # noqa: E402
from attnpatch import api, report, verify  # noqa: E402
from attnpatch.api import plan_apply, plans  # noqa: E402
from attnpatch.core import hooks, registry  # noqa: E402
from attnpatch.errors import AttnpatchWarning  # noqa: E402
from attnpatch.patchers import MODULE_ATTR  # noqa: E402
from attnpatch.testing import tiny  # noqa: E402

SCHEMA = plans.SCHEMA


def plan_of(*rules: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"schema": SCHEMA, "rules": list(rules), **top}


def sd_run(pipe: Any, steps: int = 4) -> Any:
    return pipe("a red cube", num_inference_steps=steps, generator=tiny.generator(), output_type="pt").images


def flux_run(pipe: Any, steps: int = 3) -> Any:
    return pipe(
        "a red cube",
        num_inference_steps=steps,
        height=32,
        width=32,
        max_sequence_length=16,
        generator=tiny.generator(),
        output_type="pt",
    ).images


class Calls:
    """Observer: (component, step, served backend, rule) of every routed call of the planned pipeline."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.seen: list[tuple[str, int, str, str | None]] = []
        hooks.add_observer(self)

    def __call__(self, record: hooks.CallRecord) -> None:
        step = plan_apply.current_step(self.root)
        assert step is not None
        component = (record.site or "").split(".")[0]
        self.seen.append((component, step[0], record.served, hooks.selection_origin(record.site)))

    def served(self, component: str) -> dict[int, set[str]]:
        by_step: dict[int, set[str]] = {}
        for name, step, served, _ in self.seen:
            if name == component:
                by_step.setdefault(step, set()).add(served)
        return by_step


# --- the plan file -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"schema": "attnpatch.plan/9", "rules": []}, "schema 'attnpatch.plan/9' is not 'attnpatch.plan/1'"),
        ({"schema": SCHEMA, "rules": {"unet": "native"}}, "'rules' must be a list"),
        (plan_of({"match": "unet.[0", "backend": "native"}), "rule 1 ('unet.[0'): match 'unet.[0' opens a '['"),
        (plan_of({"match": "unet attn", "backend": "native"}), "match 'unet attn' has spaces"),
        (plan_of({"match": "", "backend": "native"}), "rule 1 (''): match '' is not a glob"),
        (plan_of({"match": "unet..attn", "backend": "native"}), "has an empty path part"),
        (plan_of({"match": "unet", "backend": 3}), "rule 1 ('unet'): backend 3 is not a backend name"),
        (plan_of({"match": "unet", "backend": "native", "steps": "1-3"}), "steps '1-3' is not 'start:stop'"),
        (plan_of({"match": "unet", "backend": "native", "steps": "a:2"}), "steps 'a:2': 'a' is not an integer"),
        (plan_of({"match": "unet", "backend": "native", "steps": "3:1"}), "steps '3:1' holds no step"),
        (plan_of({"match": "unet", "backend": "native", "steps": 2}), "steps 2 is not 'start:stop' or null"),
        (plan_of({"match": "unet", "backend": "native"}, budget="x"), "budget 'x' is not a number"),
        (
            plan_of({"match": "unet", "backend": "native"}, {"match": "vae", "backend": "flsh"}),
            "rule 2 ('vae'): unknown attention backend 'flsh'",
        ),
    ],
)
def test_a_bad_plan_is_one_line_naming_the_rule_the_value_and_the_fix(data: Any, expected: str) -> None:
    with pytest.raises(plans.PlanError) as caught:
        plans.load(data)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith("plan <dict>")


def test_a_missing_or_broken_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(plans.PlanError, match=r"plan '.*nothere.json': no such file; pass the file `tune --out`"):
        plans.load(tmp_path / "nothere.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": ')
    with pytest.raises(plans.PlanError, match=r"broken.json' is not JSON \(Expecting value"):
        plans.load(broken)
    broken.write_text("[]")
    with pytest.raises(plans.PlanError, match=r"broken.json': the top level must be a JSON object, got list"):
        plans.load(broken)
    with pytest.raises(plans.PlanError, match=r"plan must be a path to a plan file or the plan as a dict, got list"):
        plans.load([])  # type: ignore[arg-type]
    # The runner's check leaves unknown backends to apply time (a script may register its own).
    assert plans.problem(plan_of({"match": "unet", "backend": "registered_later"})) is None


def test_most_specific_rule_first_and_steps_as_slices() -> None:
    plan = plans.load(
        plan_of(
            {"match": "*", "backend": "native"},
            {"match": "unet", "backend": "_native_math"},
            {"match": "unet", "backend": "native", "steps": "1:-1"},
            {"match": "unet.mid_block.*", "backend": "_native_flash", "steps": "-1:"},
        )
    )
    rules = plan.rules_for("unet.mid_block.attentions.0.transformer_blocks.0.attn1")
    assert [r.index for r in rules] == [4, 3, 2, 1]
    chosen = [plans.choose(rules, step, 4).index for step in range(4)]  # type: ignore[union-attr]
    assert chosen == [2, 3, 3, 4]
    # Unknown number of steps: bounds from the end hold nowhere, the others still do.
    assert plans.choose(rules, 3, None).index == 2  # type: ignore[union-attr]
    assert [r.index for r in plan.rules_for("vae.decoder.mid_block.attentions.0")] == [1]
    assert rules[1].label == "rule 3: unet [1:-1]"


# --- applying it ---------------------------------------------------------------------------------------------------


def test_sd_step_rules_follow_the_denoising_steps_and_restart_at_each_call() -> None:
    pipe = tiny.stable_diffusion_pipeline()
    plan = plan_of(
        {"match": "unet", "backend": "native"},
        {"match": "unet", "backend": "_native_math", "steps": "1:-1"},
        {"match": "text_encoder", "backend": "_native_math", "steps": "0:1"},
        {"match": "vae", "backend": "_native_flash", "steps": "-1:"},
    )
    attnpatch.apply(pipe, plan=plan)
    calls = Calls(pipe)
    for _ in range(2):
        calls.seen.clear()
        sd_run(pipe, steps=4)
        assert calls.served("unet") == {0: {"native"}, 1: {"_native_math"}, 2: {"_native_math"}, 3: {"native"}}
        assert calls.served("text_encoder") == {0: {"_native_math"}}  # before the first step: step 0
        assert calls.served("vae") == {3: {"_native_flash"}}  # after the last step: the last step
    rules = Counter((name, step, rule) for name, step, _, rule in calls.seen if name == "unet")
    assert rules[("unet", 1, "rule 2: unet [1:-1]")] == 8  # the tiny UNet's 8 attention layers
    assert rules[("unet", 3, "rule 1: unet")] == 8
    # Another number of steps: "-1:" and "1:-1" follow it.
    calls.seen.clear()
    sd_run(pipe, steps=3)
    assert calls.served("unet") == {0: {"native"}, 1: {"_native_math"}, 2: {"native"}}
    assert calls.served("vae") == {2: {"_native_flash"}}
    attnpatch.unapply(pipe)


def test_flux_plan_per_layer_and_step_and_a_script_registered_backend() -> None:
    seen: list[int] = []

    def counted(*args: Any) -> torch.Tensor:
        seen.append(1)
        return registry.get_backend("native").fn(*args)

    attnpatch.register_backend("plan_test_mine", counted, replace=True)
    try:
        pipe = tiny.flux_pipeline()
        plan = plan_of(
            {"match": "transformer", "backend": "native"},
            {"match": "transformer.single_transformer_blocks.*", "backend": "plan_test_mine", "steps": "1:"},
            {"match": "text_encoder_2", "backend": "_native_math"},
        )
        attnpatch.apply(pipe, plan=plan)
        calls = Calls(pipe)
        flux_run(pipe, steps=3)
        single = Counter((s, b) for n, s, b, r in calls.seen if r and "single" in r)
        assert single == {(1, "plan_test_mine"): 1, (2, "plan_test_mine"): 1}
        double = {(s, b) for n, s, b, r in calls.seen if r == "rule 1: transformer"}
        assert double == {(0, "native"), (1, "native"), (2, "native")}
        assert len(seen) == 2
        assert calls.served("text_encoder_2") == {0: {"_native_math"}}
        assert "text_encoder" not in {n for n, *_ in calls.seen}  # no rule: left as it was (unrouted)
        attnpatch.unapply(pipe)
    finally:
        attnpatch.unregister_backend("plan_test_mine")


def test_a_bare_model_counts_its_forward_calls_from_apply_and_needs_steps_for_bounds_from_the_end() -> None:
    model = tiny.flux_transformer()
    plan = plan_of({"match": "*", "backend": "native"}, {"match": "*", "backend": "_native_math", "steps": "-1:"})
    with pytest.raises(plans.PlanError, match=r"a bare model .* attnpatch.apply\(model, plan=..., steps=N\)"):
        attnpatch.apply(model, plan=plan)
    assert not any(MODULE_ATTR in vars(m) for m in model.modules())  # nothing changed
    attnpatch.apply(model, plan=plan, steps=3)
    calls = Calls(model)
    inputs = _flux_inputs()
    with torch.no_grad():
        for _ in range(3):
            model(**inputs)
    assert calls.served("transformer_blocks") == {0: {"native"}, 1: {"native"}, 2: {"_native_math"}}
    attnpatch.apply(model, plan=plan, steps=3)  # applying again restarts the count
    assert plan_apply.current_step(model) == (0, 3)
    attnpatch.unapply(model)


def _flux_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
    }


def test_an_all_native_plan_is_bitwise_the_unpatched_pipeline_and_unapply_leaves_nothing() -> None:
    pipe = tiny.stable_diffusion_pipeline()
    expected = sd_run(pipe, steps=2)
    cls = type(pipe)
    own_call = cls.__dict__["__call__"]
    attnpatch.apply(pipe, plan=plan_of({"match": "*", "backend": "native", "steps": "0:1"}))
    assert cls.__dict__["__call__"] is not own_call
    assert hooks.selection_origin("unet.mid_block.attentions.0.transformer_blocks.0.attn1") == "rule 1: * [0:1]"
    assert torch.equal(sd_run(pipe, steps=2), expected)
    attnpatch.unapply(pipe)
    assert cls.__dict__["__call__"] is own_call
    assert "step" not in vars(pipe.scheduler)
    assert not pipe.unet._forward_pre_hooks
    assert not any(MODULE_ATTR in vars(m) for _, c in api.components(pipe) for m in c.modules())
    assert hooks.snapshot()["origin"] is None
    assert api.installed_patchers() == []
    assert plan_apply.applied(pipe) is None
    assert torch.equal(sd_run(pipe, steps=2), expected)


def test_apply_without_a_plan_replaces_it_and_errors_change_nothing() -> None:
    pipe = tiny.stable_diffusion_pipeline()
    with pytest.raises(plans.PlanError, match=r"no rule matches an attention layer of StableDiffusionPipeline"):
        attnpatch.apply(pipe, plan=plan_of({"match": "transformer", "backend": "native"}))
    with pytest.raises(TypeError, match="a backend or a plan, not both"):
        attnpatch.apply(pipe, backend="native", plan=plan_of({"match": "unet", "backend": "native"}))
    assert api.installed_patchers() == []
    attnpatch.apply(pipe, plan=plan_of({"match": "unet", "backend": "_native_math", "steps": "1:"}))
    attnpatch.apply(pipe, backend="native")  # the plan's step hooks go: they would re-mark the layers
    assert plan_apply.applied(pipe) is None and not pipe.unet._forward_pre_hooks
    attnpatch.unapply(pipe)


def test_a_plan_made_elsewhere_warns_once(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    plans.write(plan_of({"match": "unet", "backend": "native"}, env={"torch": "1.0.0", "device": "NVIDIA H100"}), path)
    pipe = tiny.stable_diffusion_pipeline()
    with pytest.warns(AttnpatchWarning, match=r"plan.json' was made in another environment: torch 1.0.0 \(here 2"):
        attnpatch.apply(pipe, plan=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnpatch.apply(pipe, plan=str(path))
    attnpatch.unapply(pipe)


def test_the_report_names_the_rule_and_verify_runs_alongside(tmp_path: Path) -> None:
    pipe = tiny.stable_diffusion_pipeline()
    report.enable(tmp_path / "run.json")
    verify.enable()
    try:
        attnpatch.apply(
            pipe,
            plan=plan_of(
                {"match": "unet", "backend": "native"},
                {"match": "unet", "backend": "_native_math", "steps": "1:"},
                {"match": "vae", "backend": "_native_flash"},
            ),
        )
        sd_run(pipe, steps=2)
        data = report.snapshot()
        text = report.format_table(data)
    finally:
        verify_rows = verify.site_summary()
        verify.disable()
        report.disable()
        attnpatch.unapply(pipe)
    site = next(s for s in data["sites"] if s["site"] == "unet.mid_block.attentions.0.transformer_blocks.0.attn1")
    assert site["rules"] == {"rule 1: unet": 1, "rule 2: unet [1:]": 1}
    assert site["served"] == {"native": 1, "_native_math": 1}
    vae = next(s for s in data["sites"] if s["site"].startswith("vae"))
    assert vae["rules"] == {"rule 3: vae": 1}
    header = text.splitlines()[1]
    assert header.split()[-2:] == ["rule", "verify"]
    assert "rule 1: unet (1); rule 2: unet [1:] (1)" in text
    assert verify_rows and all(row["failed"] == 0 for row in verify_rows)
    assert {row["site"].split(".")[0] for row in verify_rows} == {"unet", "vae"}
    json.dumps(data)  # the rules column is JSON


def test_process_wide_plan_is_applied_at_a_models_first_call_and_deactivates() -> None:
    pipe = tiny.stable_diffusion_pipeline()
    plan_apply.activate(plan_of({"match": "unet", "backend": "_native_math", "steps": "1:"}))
    try:
        served: list[tuple[str, str]] = []
        hooks.add_observer(lambda r: served.append(((r.site or "").split(".")[0], r.served)))
        sd_run(pipe, steps=2)
        assert plan_apply.applied(pipe) is not None
        assert Counter(served) == {("unet", "native"): 8, ("unet", "_native_math"): 8}
    finally:
        plan_apply.deactivate()
        attnpatch.unapply(pipe)
    assert plan_apply.active() is None
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_process_wide_plan_with_an_unknown_backend_is_one_line_and_the_model_runs(capsys) -> None:
    pipe = tiny.stable_diffusion_pipeline()
    expected = sd_run(pipe, steps=2)
    plan_apply.activate(plan_of({"match": "unet", "backend": "flsh"}))
    try:
        for _ in range(2):
            assert torch.equal(sd_run(pipe, steps=2), expected)
    finally:
        plan_apply.deactivate()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("attnpatch: plan <dict>, rule 1 ('unet'): unknown attention backend 'flsh'")
    assert lines[0].endswith("; running without the plan")
    assert plan_apply.applied(pipe) is None
