"""Build every tiny model under the installed diffusers / transformers, count routed vs total attention calls,
and write the compatibility table (library version x model family x routed fraction) into docs/compat.md.

    python scripts/compat_table.py            # print the table and update docs/compat.md
    python scripts/compat_table.py --print    # print only

Rows measured under other library versions (an old-version CI job, a venv) are kept: docs/compat.md carries its
data in a comment, and a run replaces only the columns of the versions it measured. "total" is the number of
softmax attention calls the unpatched model makes (torch SDPA calls, or, for eager-only models, the calls
attnpatch saw and passed through); "routed" is how many of them reached the dispatcher with attnpatch.apply.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]
DOC = os.path.join(ROOT, "docs", "compat.md")
DATA_RE = re.compile(r"<!-- compat-data\n(.*?)\n-->", re.S)

import torch  # noqa: E402

from attnpatch import api  # noqa: E402
from attnpatch.core import dispatch, hooks  # noqa: E402


def measure(build: Callable[[], Any], run: Callable[[Any], Any]) -> dict[str, Any]:
    """{routed, total, passthrough: {reason: calls}} for one model: unpatched run, then applied with native."""
    from attnpatch.testing import diffusers_models as dm

    model = build()
    with dm.SdpaCounter() as counter:
        run(model)
    records: list[Any] = []
    dispatch.reset_fallbacks()
    hooks.add_observer(records.append)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            api.apply(model, "native")
        run(model)
    finally:
        hooks.remove_observer(records.append)
        api.unapply(model)
    passthrough: dict[str, int] = {}
    for (_, reason), calls in dispatch.passthrough_counts().items():
        passthrough[reason] = passthrough.get(reason, 0) + calls
    total = max(counter.calls, len(records) + sum(passthrough.values()))
    return {"routed": len(records), "total": total, "passthrough": passthrough}


def diffusers_cases() -> dict[str, tuple[Callable[[], Any], Callable[[Any], Any]] | str]:
    from attnpatch.testing import diffusers_models as dm

    cases: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]] | str] = {}
    for name, fam in dm.FAMILIES.items():
        missing = dm.missing_reason(fam)
        cases[name] = missing or (
            lambda fam=fam: dm.build(fam),
            lambda model, fam=fam: dm.run(fam, model),
        )
    return cases


def transformers_cases() -> dict[str, tuple[Callable[[], Any], Callable[[Any], Any]] | str]:
    try:
        from attnpatch.testing import transformers_extra as xm
        from attnpatch.testing import transformers_models as tm
    except ImportError as exc:
        return {"transformers": f"not measured: {exc}"}

    def forward(inputs: Callable[[], dict[str, Any]]) -> Callable[[Any], Any]:
        def run(model: Any) -> Any:
            with torch.no_grad():
                return model(**inputs())

        return run

    def padded() -> dict[str, Any]:
        ids, mask = tm.left_padded_ids()
        return {"input_ids": ids, "attention_mask": mask}

    def ids_only() -> dict[str, Any]:
        return {"input_ids": tm.left_padded_ids()[0]}

    candidates: dict[str, tuple[Any, Callable[[], dict[str, Any]]]] = {
        "llama": (getattr(tm, "llama", None), padded),
        "clip_text": (getattr(tm, "clip_text", None), ids_only),
        "t5_encoder": (getattr(tm, "t5_encoder", None), padded),
        "umt5_encoder": (getattr(tm, "umt5_encoder", None), padded),
        "gemma2 (softcap)": (getattr(tm, "gemma2", None), padded),
        "qwen2_5_vl": (getattr(tm, "qwen2_5_vl", None), getattr(tm, "qwen2_5_vl_inputs", padded)),
        # Issue 12: soft-capping, sliding layers, attention sinks (9-token prompts, windows of 4).
        "gemma3 (sliding)": (xm.gemma3, xm.left_padded),
        "gpt_oss (sinks, sliding)": (xm.gpt_oss, xm.left_padded),
        "mistral (sliding)": (xm.mistral, xm.left_padded),
        "qwen2 (sliding)": (xm.qwen2, xm.left_padded),
    }
    cases: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]] | str] = {}
    for name, (build, inputs) in candidates.items():
        cases[name] = "no builder" if build is None else (build, forward(inputs))
    return cases


def versions() -> dict[str, str]:
    found = {}
    for library in ("diffusers", "transformers"):
        with contextlib.suppress(ImportError):
            found[library] = __import__(library).__version__
    return found


def collect() -> dict[str, dict[str, str]]:
    """{column (library version): {family: cell}} for this interpreter."""
    found = versions()
    table: dict[str, dict[str, str]] = {}
    groups = [("diffusers", diffusers_cases), ("transformers", transformers_cases)]
    for library, cases in groups:
        if library not in found:
            continue
        column = f"{library} {found[library]}"
        cells = table.setdefault(column, {})
        for name, case in cases().items():
            if isinstance(case, str):
                cells[f"{library}: {name}"] = "n/a"
                continue
            try:
                result = measure(*case)
            except ImportError:  # the builder says this version lacks the model
                cells[f"{library}: {name}"] = "n/a"
                continue
            except Exception as exc:  # a model this version cannot build or run is a table entry, not a crash
                cells[f"{library}: {name}"] = f"error: {type(exc).__name__}: {str(exc)[:80]}"
                continue
            cell = f"{result['routed']}/{result['total']}"
            if result["total"] == 0:
                cell = "no SDPA call (attention computed inline: not counted)"
            if result["passthrough"]:
                cell += " (passed through: " + "; ".join(sorted(result["passthrough"])) + ")"
            cells[f"{library}: {name}"] = cell
    return table


def render(data: dict[str, dict[str, str]]) -> str:
    by_library: dict[str, list[str]] = {}
    for column in sorted(data, key=_column_key):
        by_library.setdefault(column.split(" ", 1)[0], []).append(column)
    out = []
    for library, columns in by_library.items():
        families = sorted({f for c in columns for f in data[c]}, key=lambda f: _family_order(library, f))
        out.append(f"### {library}\n")
        out.append("| model family | " + " | ".join(c.split(" ", 1)[1] for c in columns) + " |")
        out.append("|---|" + "---|" * len(columns))
        for fam in families:
            cells = [data[c].get(fam, "not measured") for c in columns]
            out.append(f"| {fam.split(': ', 1)[1]} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _column_key(column: str) -> tuple[Any, ...]:
    library, _, version = column.partition(" ")
    return (library, tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:3]))


def _family_order(library: str, family: str) -> tuple[int, str]:
    if library == "diffusers":
        from attnpatch.testing import diffusers_models as dm

        names = list(dm.FAMILIES)
        short = family.split(": ", 1)[1]
        return (names.index(short) if short in names else len(names), family)
    return (0, family)


HEADER = """# Compatibility

Generated by `python scripts/compat_table.py` (do not edit the tables by hand). Each cell is
`routed/total` softmax attention calls of one forward pass of a tiny model built from config, patched with
`attnpatch.apply(model, "native")`; a call that is passed to the library's own code on purpose says why.
Columns are the library versions the script was run under; each run replaces the columns of its versions.
Layers that are not softmax attention over q/k/v (Sana's linear attention, bmm+softmax processors that return
the probabilities) are not counted: they are left alone by design. n/a: the model does not exist in that version;
not measured: the row was added after that version's column was last measured.
"""


def write(data: dict[str, dict[str, str]]) -> None:
    merged: dict[str, dict[str, str]] = {}
    if os.path.exists(DOC):
        with open(DOC) as f:
            match = DATA_RE.search(f.read())
        if match:
            merged = json.loads(match.group(1))
    merged.update(data)
    text = HEADER + "\n" + render(merged) + "\n<!-- compat-data\n" + json.dumps(merged, indent=1, sort_keys=True)
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w") as f:
        f.write(text + "\n-->\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the table, do not update docs/compat.md")
    opts = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    data = collect()
    print(render(data))
    if not opts.print:
        write(data)
        print(f"updated {os.path.relpath(DOC, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
