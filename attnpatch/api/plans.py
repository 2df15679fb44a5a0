"""Attention plans: which backend each attention layer uses, per denoising step, read from a JSON file.

``python -m attnpatch tune script.py --budget 1e-2 --out plan.json`` writes one (attnpatch.cli.tune); this module
reads and checks it, and says which rule chooses a layer's backend at a step. Applying it is
:mod:`attnpatch.api.plan_apply` (``attnpatch.apply(pipe, plan=...)``, ``--plan``, ``ATTNPATCH_PLAN``).

Schema ``attnpatch.plan/1``::

    {"schema": "attnpatch.plan/1",
     "env": {"attnpatch": "0.1.0", "torch": "2.13.0", "device": "cpu x86_64 (2 threads)",
             "diffusers": "0.42.1", "transformers": "5.25.0"},
     "budget": 0.01, "metric": "max_abs",
     "rules": [{"match": "transformer.transformer_blocks.*.attn", "backend": "sage", "steps": "1:-1",
                "measured": {"sage": {"seconds": 0.0012, "max_abs_err": 0.004, ...}, "native": {...}}}]}

A rule's ``match`` is a glob over layer paths (``transformer.transformer_blocks.*.attn``) and their parents
(``transformer``, ``text_encoder*``); ``backend`` a selection (name, alias or chain); ``steps`` null (every step)
or ``"start:stop"``, Python slice bounds over the denoising steps, negative ones counted from the number of steps
(``"0:1"`` the first, ``"1:-1"`` all but the first and last, ``"-1:"`` the last). Where several rules match a layer
at a step, the most specific wins: the most literal (non-wildcard) characters, then a rule limited to steps over
one that is not, then the later rule. Only ``schema`` and ``rules`` (with ``match`` and ``backend``) are required.

Every problem is one line naming the plan, the rule, the value and the fix (:class:`PlanError`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnpatch.core import selection, versions
from attnpatch.errors import AttnpatchError, AttnpatchWarning, UnknownBackendError, shown

SCHEMA = "attnpatch.plan/1"
METRICS = ("max_abs", "rel")
_WRITE_ONE = "write one with `python -m attnpatch tune script.py --out plan.json` (docs/plans.md)"


class PlanError(AttnpatchError, ValueError):
    """A plan file that cannot be used: one line naming the plan, the rule, the value and the fix."""


@dataclass(frozen=True)
class Rule:
    """One rule of a plan. ``index`` is its position in the file, from 1; ``backend`` the selection as written."""

    index: int
    match: str
    backend: str
    steps: str | None = None
    start: int | None = None
    stop: int | None = None
    measured: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        """How the report names the rule: ``rule 2: transformer [1:-1]``."""
        return f"rule {self.index}: {self.match}" + (f" [{self.steps}]" if self.steps else "")

    @property
    def specificity(self) -> tuple[int, bool, int]:
        return (sum(ch not in "*?[]" for ch in self.match), self.steps is not None, self.index)

    @property
    def counts_from_end(self) -> bool:
        """Whether the steps it covers depend on the number of steps (a negative bound)."""
        return any(bound is not None and bound < 0 for bound in (self.start, self.stop))

    def covers(self, step: int, total: int | None) -> bool:
        """Whether the rule holds at ``step`` (from 0) of ``total`` steps (None: unknown; negative bounds fail)."""
        if self.steps is None:
            return True
        if total is None and self.counts_from_end:
            return False
        start, stop = self.start, self.stop
        if start is not None and start < 0:
            start += total  # type: ignore[operator]
        if stop is not None and stop < 0:
            stop += total  # type: ignore[operator]
        return (start is None or step >= start) and (stop is None or step < stop)

    def matches(self, site: str) -> bool:
        """Whether ``match`` matches the layer path ``site`` or one of its parents."""
        return any(fnmatch.fnmatchcase(path, self.match) for path in _prefixes(site))


@dataclass
class Plan:
    """A checked plan. ``source`` names it in messages (the file's path, or ``<dict>``)."""

    source: str
    rules: list[Rule]
    budget: float | None = None
    metric: str | None = None
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The plan as messages name it: its path, quoted, or ``<dict>``."""
        return named(self.source)

    def rules_for(self, site: str) -> list[Rule]:
        """The rules matching the layer ``site``, most specific first."""
        found = [rule for rule in self.rules if rule.matches(site)]
        return sorted(found, key=lambda rule: rule.specificity, reverse=True)

    def as_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "env": self.env,
            "budget": self.budget,
            "metric": self.metric,
            "rules": [
                {"match": r.match, "backend": r.backend, "steps": r.steps, "measured": r.measured} for r in self.rules
            ],
        }


def choose(rules: list[Rule], step: int, total: int | None) -> Rule | None:
    """The rule of ``rules`` (most specific first, as :meth:`Plan.rules_for` gives them) holding at ``step``."""
    for rule in rules:
        if rule.covers(step, total):
            return rule
    return None


def load(plan: str | os.PathLike[str] | Mapping[str, Any] | Plan, *, resolve: bool = True) -> Plan:
    """Read and check a plan (a path to its JSON, the JSON as a dict, or a Plan); raises :class:`PlanError`.

    resolve: check that every backend is registered here (False: leave that to when the plan is applied, after the
    script has registered its own backends).
    """
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        source, data = "<dict>", plan
    elif isinstance(plan, str | os.PathLike):
        source, data = str(plan), _read(Path(plan))
    else:
        raise PlanError(
            f"plan must be a path to a plan file or the plan as a dict, got {type(plan).__name__}; {_WRITE_ONE}"
        )
    return _check(source, data, resolve)


def problem(plan: str | os.PathLike[str] | Mapping[str, Any]) -> str | None:
    """Why the plan cannot be used (backends not checked: a script may register its own); None when it can."""
    try:
        load(plan, resolve=False)
    except PlanError as exc:
        return str(exc)
    return None


def write(plan: Plan | Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the plan as indented JSON, atomically (a reader never sees half a file); returns the path."""
    data = plan.as_json() if isinstance(plan, Plan) else dict(plan)
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, target)
    return target


def named(source: str) -> str:
    return source if source == "<dict>" else shown(source)


def _read(path: Path) -> Any:
    name = named(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"plan {name}: no such file; pass the file `tune --out` wrote, or {_WRITE_ONE}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"plan {name}: cannot be read ({exc}); pass a readable plan file") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PlanError(f"plan {name} is not JSON ({str(exc)[:120]}); {_WRITE_ONE}") from None


def _check(source: str, data: Any, resolve: bool) -> Plan:
    name = named(source)
    if not isinstance(data, Mapping):
        raise PlanError(f"plan {name}: the top level must be a JSON object, got {_kind(data)}; {_WRITE_ONE}")
    if data.get("schema") != SCHEMA:
        raise PlanError(
            f"plan {name}: schema {shown(data.get('schema'))} is not {SCHEMA!r} (this attnpatch reads {SCHEMA} plans; "
            f'set "schema": "{SCHEMA}" or {_WRITE_ONE})'
        )
    rules = data.get("rules")
    if not isinstance(rules, list):
        raise PlanError(
            f'plan {name}: \'rules\' must be a list of {{"match": glob, "backend": name, "steps": "start:stop" '
            f"or null}} objects, got {_kind(rules)}"
        )
    budget = data.get("budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)):
        raise PlanError(f"plan {name}: budget {shown(budget)} is not a number; give a number such as 0.01, or null")
    metric = data.get("metric")
    if metric is not None and metric not in METRICS:
        raise PlanError(f"plan {name}: metric {shown(metric)} is not one of {', '.join(METRICS)} (or null)")
    plan_env = data.get("env")
    checked = Plan(source, [_rule(name, i, raw) for i, raw in enumerate(rules, 1)], budget, metric, {})
    checked.env = dict(plan_env) if isinstance(plan_env, Mapping) else {}
    if resolve:
        check_backends(checked)
    return checked


def check_backends(plan: Plan) -> None:
    """Raise :class:`PlanError` naming the first rule whose backend is not registered in this process."""
    for rule in plan.rules:
        try:
            selection.resolve(rule.backend)
        except UnknownBackendError as exc:
            raise PlanError(
                f"plan {plan.name}, rule {rule.index} ({shown(rule.match, 80)}): {exc}. A backend your "
                "script registers must be registered before the plan is applied"
            ) from None


def _rule(name: str, index: int, raw: Any) -> Rule:
    where = f"plan {name}, rule {index}"
    if not isinstance(raw, Mapping):
        raise PlanError(f"{where}: a rule must be an object with 'match' and 'backend', got {_kind(raw)}")
    match = raw.get("match")
    where += f" ({shown(match, 80)})" if isinstance(match, str) else ""
    glob_problem = _glob_problem(match)
    if glob_problem:
        raise PlanError(f"{where}: match {shown(match)} {glob_problem}")
    backend = raw.get("backend")
    if not isinstance(backend, str) or not backend.strip():
        raise PlanError(
            f"{where}: backend {shown(backend)} is not a backend name; give a name or chain such as 'native' or "
            "'sage,native' (python -m attnpatch list)"
        )
    steps = raw.get("steps")
    start, stop = _steps(where, steps)
    measured = raw.get("measured")
    if measured is not None and not isinstance(measured, Mapping):
        raise PlanError(f"{where}: 'measured' must be an object (backend -> numbers) or absent, got {_kind(measured)}")
    return Rule(index, match, backend.strip(), steps, start, stop, dict(measured or {}))  # type: ignore[arg-type]


def _glob_problem(match: Any) -> str:
    if not isinstance(match, str) or not match.strip():
        return "is not a glob; give a layer path or pattern such as 'transformer', 'text_encoder*' or 'unet.*.attn1'"
    if match != match.strip() or any(ch.isspace() for ch in match):
        return "has spaces; layer paths have none (e.g. 'transformer.transformer_blocks.*.attn')"
    if match.startswith(".") or match.endswith(".") or ".." in match:
        return "has an empty path part; separate the parts with single dots, e.g. 'unet.mid_block'"
    depth = 0
    for ch in match:
        depth += ch == "["
        depth -= ch == "]" and depth > 0
    if depth:
        return "opens a '[' it does not close; close it ('blocks.[0-3].attn') or leave it out"
    return ""


_STEPS_FIX = "write 'start:stop' like '0:1' (the first step), '1:-1' (all but the first and last) or '-1:' (the last)"


def _steps(where: str, steps: Any) -> tuple[int | None, int | None]:
    if steps is None:
        return None, None
    if not isinstance(steps, str) or steps.count(":") != 1:
        raise PlanError(f"{where}: steps {shown(steps)} is not 'start:stop' or null; {_STEPS_FIX}")
    bounds: list[int | None] = []
    for part in steps.split(":"):
        part = part.strip()
        try:
            bounds.append(int(part) if part else None)
        except ValueError:
            raise PlanError(f"{where}: steps {shown(steps)}: {part!r} is not an integer; {_STEPS_FIX}") from None
    start, stop = bounds
    if start is not None and stop is not None and (start < 0) == (stop < 0) and stop <= start:
        raise PlanError(f"{where}: steps {shown(steps)} holds no step (stop <= start); {_STEPS_FIX}")
    return start, stop


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _prefixes(site: str) -> Iterator[str]:
    parts = site.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


# --- where the plan was made ---------------------------------------------------------------------------------------


def environment(device: str | None = None) -> dict[str, Any]:
    """This process's versions (attnpatch, torch, diffusers, transformers) and ``device``: a plan's ``env``."""
    from attnpatch import __version__

    found: dict[str, Any] = {"attnpatch": __version__, "torch": versions.distribution_version("torch")}
    found["device"] = device
    for library in ("diffusers", "transformers"):
        found[library] = versions.distribution_version(library)
    return found


_warned: set[str] = set()


def warn_if_elsewhere(plan: Plan, device: str | None) -> None:
    """One warning per plan when it was made with other versions or another device than this process has.

    device: this process's device description (``cpu ...``, ``NVIDIA H100 ...``); compared by its first word.
    """
    if not plan.env or plan.source in _warned:
        return
    here = environment(device)
    differ = []
    for key in ("attnpatch", "torch", "diffusers", "transformers"):
        if key in plan.env and plan.env[key] != here[key]:
            differ.append(f"{key} {plan.env[key]} (here {here[key]})")
    made_on = plan.env.get("device")
    if device and isinstance(made_on, str) and made_on.split(" (")[0] != device.split(" (")[0]:
        differ.append(f"device {made_on} (here {device})")
    if differ:
        _warned.add(plan.source)
        warnings.warn(
            f"attnpatch: plan {plan.name} was made in another environment: {', '.join(differ)}; its "
            "timings and errors may not hold here. Tune again here: python -m attnpatch tune script.py --out plan.json",
            AttnpatchWarning,
            stacklevel=4,
        )
