"""The measuring side of ``python -m attnpatch tune``: an observer of routed calls, and the plan it makes.

At the first call of each (layer, kind) the observer measures the candidates on the call's own tensors
(:func:`attnpatch.autotune.measure`: fastest run and error against float64) and rewrites the plan file; later calls
of the kind are only counted, to weigh each kind's time in the layer's total.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from attnpatch import autotune
from attnpatch.api import plans
from attnpatch.core import hooks, masks, registry
from attnpatch.core.call import CallSpec
from attnpatch.core.registry import Backend
from attnpatch.errors import UnknownBackendError
from attnpatch.report import align, group_name

_ERROR_KEY = {"max_abs": "max_abs_err", "rel": "max_rel_err"}


class Tuner:
    """Measures candidates per (layer, call kind) and keeps the plan file at ``out`` up to date."""

    def __init__(self, budget: float, metric: str, candidates: list[str] | None, out: Path) -> None:
        self.budget = budget
        self.metric = metric
        self.names = candidates
        self.out = out
        # site -> kind -> {"calls": n, "measured": {backend: measurements}}
        self.sites: dict[str, dict[str, dict[str, Any]]] = {}
        self.device: str | None = None
        self.unknown: dict[str, str] = {}  # --candidates name -> why it is not registered (yet)
        self.busy = False

    def observe(self, record: hooks.CallRecord) -> None:
        site = record.site
        if site is None or site == hooks.DIRECT or self.busy or record.dropout_p > 0:
            return  # a plan cannot name a direct call; dropout makes errors meaningless
        mask_kind = masks.kind_of(record.attn_mask)
        call = CallSpec.of(
            record.query, record.key, record.value, mask_kind, record.dropout_p, record.is_causal, record.scale
        )
        kind = autotune.kind_of(call, record.query.shape[0])
        kinds = self.sites.setdefault(site, {})
        entry = kinds.get(kind)
        if entry is not None:
            entry["calls"] += 1
            return
        self.busy = True  # the candidates' own calls (a backend calling SDPA) are not measured again
        try:
            self._measure(site, kind, kinds, call, record)
        finally:
            self.busy = False

    def _measure(self, site: str, kind: str, kinds: dict[str, Any], call: CallSpec, record: hooks.CallRecord) -> None:
        if self.device is None:
            self.device = autotune.device_description(record.query.device)
        backends, refused = self._candidates(call)
        gqa = record.query.shape[2] != record.key.shape[2]
        args = (
            record.query,
            record.key,
            record.value,
            record.attn_mask,
            record.dropout_p,
            record.is_causal,
            record.scale,
            gqa,
        )
        measured = autotune.measure(backends, args) if backends else {}
        measured.update({name: {"error": f"cannot serve this call: {why}"} for name, why in refused.items()})
        kinds[kind] = {"calls": 1, "measured": measured}
        ranking = sorted(
            ((m["seconds"], name, m[_ERROR_KEY[self.metric]]) for name, m in measured.items() if "seconds" in m),
        )
        shown = ", ".join(f"{name} {s * 1e3:.3g} ms err {e:.1e}" for s, name, e in ranking)
        failed = "".join(f"; {name}: {m['error']}" for name, m in measured.items() if "error" in m)
        _say(f"attnpatch tune: {site} [{kind}]: {shown or 'no candidate ran'}{failed}")
        self.save()

    def _candidates(self, call: CallSpec) -> tuple[list[Backend], dict[str, str]]:
        if self.names is None:
            return [b for b in registry.list_backends() if not b.call_reasons(call)], {}
        chosen, refused = [], {}
        for name in self.names:
            try:
                backend = registry.get_backend(name)
            except UnknownBackendError as exc:
                self.unknown[name] = str(exc)
                continue
            self.unknown.pop(name, None)
            reasons = backend.call_reasons(call)
            if reasons:
                refused[backend.name] = "; ".join(reasons)
            else:
                chosen.append(backend)
        return chosen, refused

    # --- the plan ---------------------------------------------------------------------------------------------

    def site_results(self) -> dict[str, tuple[str | None, dict[str, dict[str, Any]], str]]:
        """site -> (chosen backend or None, per-backend measurements over the site's kinds, note)."""
        results = {}
        for site, kinds in self.sites.items():
            totals: dict[str, dict[str, Any]] = {}
            calls = sum(k["calls"] for k in kinds.values())
            for entry in kinds.values():
                for name, m in entry["measured"].items():
                    total = totals.setdefault(
                        name, {"seconds": 0.0, "max_abs_err": 0.0, "max_rel_err": 0.0, "within_tolerance": True}
                    )
                    if "error" in m:
                        total["error"] = m["error"]
                        continue
                    total["seconds"] += m["seconds"] * entry["calls"] / calls  # mean seconds per call
                    total["max_abs_err"] = max(total["max_abs_err"], m["max_abs_err"])
                    total["max_rel_err"] = max(total["max_rel_err"], m["max_rel_err"])
                    total["within_tolerance"] = total["within_tolerance"] and m["within_tolerance"]
            for name, total in totals.items():
                if "error" in total:
                    totals[name] = {"error": total["error"]}
                else:
                    total["calls"], total["kinds"] = calls, len(kinds)
            results[site] = self._choose(totals)
        return results

    def _choose(self, totals: dict[str, dict[str, Any]]) -> tuple[str | None, dict[str, dict[str, Any]], str]:
        key = _ERROR_KEY[self.metric]
        ran = {n: m for n, m in totals.items() if "error" not in m and math.isfinite(m[key])}
        within = {n: m for n, m in ran.items() if m[key] <= self.budget}
        if within:
            return min(within, key=lambda n: within[n]["seconds"]), totals, ""
        if ran:
            best = min(ran, key=lambda n: ran[n][key])
            note = f"no candidate within the budget {self.budget:g} ({self.metric}); the most accurate: {best}"
            return best, totals, note
        return None, totals, "no candidate ran"

    def plan(self) -> dict[str, Any]:
        """The plan as JSON (schema attnpatch.plan/1): one rule per group of alike layers, else per layer."""
        results = self.site_results()
        groups: dict[str, list[str]] = {}
        for site in results:
            groups.setdefault(group_name(site), []).append(site)
        rules = []
        for pattern, sites in groups.items():
            chosen = {results[s][0] for s in sites}
            if len(sites) > 1 and len(chosen) == 1 and None not in chosen:
                rules.append(_rule(pattern, chosen.pop(), [results[s][1] for s in sites]))
                continue
            rules += [_rule(s, results[s][0], [results[s][1]]) for s in sites if results[s][0] is not None]
        return {
            "schema": plans.SCHEMA,
            "env": plans.environment(self.device),
            "budget": self.budget,
            "metric": self.metric,
            "rules": rules,
        }

    def save(self) -> None:
        try:
            plans.write(self.plan(), self.out)
        except OSError as exc:
            _say(f"attnpatch tune: cannot write the plan to {self.out} ({exc})")

    def finish(self, interrupted: bool = False) -> None:
        """Write the plan and say what it holds (after an interruption too)."""
        for name, why in self.unknown.items():
            _say(f"attnpatch tune: --candidates {name!r} was never a registered backend: {why}")
        for site, (_, _, note) in self.site_results().items():
            if note:
                _say(f"attnpatch tune: {site}: {note}")
        plan = self.plan()
        self.save()
        layers = sum(len(k) for k in self.sites.values())
        if not self.sites:
            _say("attnpatch tune: no attention call was measured (does the script run a diffusers/transformers model?)")
        head = "interrupted; " if interrupted else ""
        _say(
            f"attnpatch tune: {head}{len(self.sites)} attention layers, {layers} call kinds measured; "
            f"budget {self.budget:g} ({self.metric})\n{describe(plan)}\nplan written to {self.out}"
        )


def _rule(match: str, backend: str | None, measured: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """A rule for the layers whose measurements are ``measured``: per backend the mean time per call and layer,
    the largest errors, the calls; a backend that failed on one layer is failed for the rule."""
    merged: dict[str, dict[str, Any]] = {}
    layers: dict[str, int] = {}
    for per_site in measured:
        for name, m in per_site.items():
            into = merged.get(name)
            if "error" in m:
                merged[name] = {"error": m["error"]}
            elif into is None:
                merged[name], layers[name] = dict(m), 1
            elif "error" not in into:
                into["seconds"] += m["seconds"]
                into["max_abs_err"] = max(into["max_abs_err"], m["max_abs_err"])
                into["max_rel_err"] = max(into["max_rel_err"], m["max_rel_err"])
                into["within_tolerance"] = into["within_tolerance"] and m["within_tolerance"]
                into["calls"] += m["calls"]
                layers[name] += 1
    for name, m in merged.items():
        if "seconds" in m:
            m["seconds"] = float(f"{m['seconds'] / layers[name]:.6g}")
            m["max_abs_err"], m["max_rel_err"] = float(f"{m['max_abs_err']:.3g}"), float(f"{m['max_rel_err']:.3g}")
    ordered = dict(sorted(merged.items(), key=lambda item: item[1].get("seconds", math.inf)))
    return {"match": match, "backend": backend, "steps": None, "measured": ordered}


def describe(plan: dict[str, Any]) -> str:
    """The plan as an aligned table (rule, backend, its time and error, the runner-up)."""
    rows = [["match", "steps", "backend", "ms/call", "max abs err", "others (ms/call, err)"]]
    for rule in plan["rules"]:
        measured = rule.get("measured", {})
        chosen = measured.get(rule["backend"], {})
        others = [
            f"{name} {_ms(m)} {_err(m)}" if "error" not in m else f"{name} failed"
            for name, m in measured.items()
            if name != rule["backend"]
        ]
        rows.append(
            [
                rule["match"],
                rule.get("steps") or "-",
                rule["backend"],
                _ms(chosen),
                _err(chosen),
                ", ".join(others) or "-",
            ]
        )
    return "\n".join(align(rows))


def _ms(measured: dict[str, Any]) -> str:
    seconds = measured.get("seconds")
    return "-" if seconds is None else f"{seconds * 1e3:.3g}"


def _err(measured: dict[str, Any]) -> str:
    error = measured.get("max_abs_err")
    return "-" if error is None else f"{error:.1e}"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
