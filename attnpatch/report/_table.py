"""The report's text: the table printed at exit, and the JSON written to a ``.json`` path.

The table has one row per group of sites whose paths differ only in layer numbers, then every fallback and
passthrough reason, the layers a patcher leaves alone (with the fix), and, in the run's parent process, the
child processes that reported.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

# Passthrough reasons of layers a patcher leaves alone start with this (attnpatch.patchers.diffusers.SKIPPED).
SKIPPED = "layer left alone: "


_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")


def group_name(site: str) -> str:
    """``transformer.transformer_blocks.7.attn`` -> ``transformer.transformer_blocks.*.attn``."""
    return _NUMBER.sub("*", site)


def format_table(data: dict[str, Any]) -> str:
    """The text report: one row per group of sites, then every fallback and passthrough reason."""
    groups: dict[str, dict[str, Any]] = {}
    for site in data["sites"]:
        name = group_name(site["site"])
        group = groups.setdefault(
            name,
            {
                "modules": 0,
                "calls": 0,
                "requested": Counter(),
                "served": Counter(),
                "fallback": 0,
                "passthrough": 0,
                "shapes": set(),
                "dtypes": Counter(),
                "rules": Counter(),
                "seconds": None,
                "verify": None,
            },
        )
        group["modules"] += 1
        group["calls"] += site["calls"]
        group["requested"].update(site["requested"])
        group["served"].update(site["served"])
        group["fallback"] += site["fallback_calls"]
        group["passthrough"] += sum(p["calls"] for p in site["passthrough"])
        group["shapes"].update((tuple(s["query"]), tuple(s["key"])) for s in site["shapes"])
        group["dtypes"].update(site["dtypes"])
        group["rules"].update(site.get("rules") or {})
        if site["seconds"] is not None:
            group["seconds"] = (group["seconds"] or 0.0) + site["seconds"]
        if site["verify"] is not None:
            group["verify"] = _merge_verify(group["verify"], site["verify"])
    total = data["totals"]["attention_seconds"]
    headers = ["module", "n", "asked", "served", "calls", "fallback", "passthru", "shapes", "dtypes"]
    planned = any(g["rules"] for g in groups.values())
    if planned:
        headers.append("rule")
    if data["timed"]:
        headers.append("time")
    if any(g["verify"] for g in groups.values()):
        headers.append("verify")
    rows = []
    for name, g in groups.items():
        row = [
            name,
            str(g["modules"]),
            _counts(g["requested"]),
            _counts(g["served"]),
            str(g["calls"]),
            str(g["fallback"]),
            str(g["passthrough"]),
            str(len(g["shapes"])),
            _counts(g["dtypes"]),
        ]
        if planned:
            row.append(_rules(g["rules"], g["calls"]))
        if data["timed"]:
            timed = total and g["calls"] and g["seconds"] is not None
            row.append(f"{100 * g['seconds'] / total:.1f}%" if timed else "-")
        if "verify" in headers:
            row.append(_verify_cell(g["verify"]))
        rows.append(row)
    totals = data["totals"]
    # A child's header names it and its parent: the parent reads it back from the child's text file.
    who = f" (pid {data['pid']}, child of pid {data['parent_pid']})" if data.get("parent_pid") else ""
    lines = [
        f"attnpatch report{who}: {totals['calls']} attention calls routed, {totals['fallback_calls']} fell back, "
        f"{totals['passthrough_calls']} passed through ({data['wall_seconds']:.1f} s)"
    ]
    lines.extend(_processes(data))
    if not rows:
        lines.append("  no attention call reached attnpatch (is the model patched? see `python -m attnpatch --help`)")
    else:
        lines.extend(align([headers, *rows]))
    reasons = Counter[tuple[str, str, str]]()
    for site in data["sites"]:
        for f in site["fallbacks"]:
            reasons[(f["backend"], f["reason"], f["served_by"])] += f["calls"]
    if reasons:
        lines.append("fallbacks:")
        lines.extend(f"  {b} -> {s}: {r} ({n} calls)" for (b, r, s), n in reasons.items())
    passthrough = Counter[str]()
    skipped: dict[str, set[str]] = {}
    for site in data["sites"]:
        for p in site["passthrough"]:
            passthrough[p["reason"]] += p["calls"]
            if p["reason"].startswith(SKIPPED):
                skipped.setdefault(p["reason"], set()).add(site["site"])
    if len(passthrough) > len(skipped):
        lines.append("passed through to the library's own attention:")
        lines.extend(f"  {r} ({n} calls)" for r, n in passthrough.items() if r not in skipped)
    if skipped:
        lines.append("attention layers left alone (not routed):")
        for reason, sites in skipped.items():
            count = f"{len(sites)} layer{'s' if len(sites) > 1 else ''}"
            lines.append(f"  {reason.removeprefix(SKIPPED)} ({count}, {passthrough[reason]} calls)")
    return "\n".join(lines)


def _processes(data: dict[str, Any]) -> list[str]:
    # The parent's line about the child processes that reported beside it (none: no line).
    children = data.get("children") or []
    if not children:
        return []
    everyone = [{"pid": data["pid"], **data["totals"]}, *children]
    total = {key: sum(p[key] for p in everyone) for key in ("calls", "fallback_calls", "passthrough_calls")}
    each = "; ".join(
        f"pid {p['pid']}: {p['calls']} calls" + (f" ({p['file']})" if "file" in p else " (this one)") for p in everyone
    )
    return [
        f"  {len(everyone)} processes reported: {total['calls']} attention calls routed, "
        f"{total['fallback_calls']} fell back, {total['passthrough_calls']} passed through in all ({each})"
    ]


def _merge_verify(into: dict[str, Any] | None, row: dict[str, Any]) -> dict[str, Any]:
    if into is None:
        return dict(row)
    merged = dict(into)
    merged["checked"] += row["checked"]
    merged["failed"] += row["failed"]
    for key in ("max_abs", "max_rel", "worst"):
        merged[key] = max(merged[key], row[key])
    merged["action"] = merged.get("action") or row.get("action")
    return merged


def _verify_cell(row: dict[str, Any] | None) -> str:
    if row is None or not row["checked"]:
        return "-"
    status = "FAIL" if row["failed"] else "ok"
    moved = " -> native" if row.get("action") == "moved to native" else ""
    return f"{status} {row['max_abs']:.1e} ({row['worst']:.2g}x tol){moved}"


def _rules(rules: Counter[str], calls: int) -> str:
    # The plan rules that chose the row's backends, in the order they first served ("-": calls no rule chose).
    cells = [f"{rule} ({n})" if len(rules) > 1 or n != calls else rule for rule, n in rules.items()]
    unruled = calls - sum(rules.values())
    if unruled > 0 and rules:
        cells.append(f"- ({unruled})")
    return "; ".join(cells) or "-"


def _counts(counter: Counter[str]) -> str:
    if not counter:
        return "-"
    if len(counter) == 1:
        return next(iter(counter))
    return " ".join(f"{k}:{n}" for k, n in counter.most_common())


def align(table: list[list[str]], indent: str = "  ") -> list[str]:
    """Rows of cells -> lines with the columns aligned (the text tables of report, verify, bench and demo)."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [indent + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in table]


_INT_LIST = re.compile(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]")


def to_json(data: dict[str, Any]) -> str:
    """Indented JSON with shape lists on one line ([2, 4096, 24, 128])."""
    return _INT_LIST.sub(
        lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", json.dumps(data, indent=2)
    )
