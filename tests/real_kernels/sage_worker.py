"""Run SageAttention's real Triton kernels on CPU, under Triton's interpreter, for tests/real_kernels.

Usage: ``python sage_worker.py < cases.json > results.json``. Reads a JSON list of cases and prints one JSON object:
``{"sageattention": version, "triton": version, "torch": version, "results": [one per case, in order]}``.

A worker process, not the test process, because ``TRITON_INTERPRET=1`` must be set before triton is first
imported (it is read at import), and a pytest process may have imported triton already (torch imports it for
inductor). One process for a whole batch of cases: importing torch and triton costs seconds, a kernel call at
S <= 128 a tenth of one.

What is real here and what is not: the kernels, their launch code, the quantisation and the ``sageattn`` /
``sageattn_varlen`` wrappers are the installed library's own, run by the installed triton. One line is lifted:
the wrappers' first check, ``assert q.is_cuda`` (sageattention/core.py, 1.0.x), which would refuse the CPU
tensors that the interpreter computes on. It is removed from the function's syntax tree, the rest of the function
is compiled unchanged against the module's own globals, at its own file and line numbers, and put back in place
of the original. If that assert is not found exactly once, the worker fails rather than run a function it does
not understand. Under the interpreter a masked ``tl.load`` without ``other=`` yields 0; on a GPU it is undefined.

Case kinds (every tensor is (batch, seq, heads, head_dim), "NHD"; the reference is tests/reference.py's float64
attention, so the repository root must be on sys.path: tests/real_kernels/sage_cases.py puts it there):

- ``{"kind": "direct", "function": "sageattn", ...}``: ``sageattention.sageattn(q, k, v, tensor_layout="NHD")``.
- ``{"kind": "direct", "function": "sageattn_varlen", "kv_lengths": [...], ...}``: keys of each batch entry
  packed to its own length, queries kept whole (seq_q each), as attnpatch's sage_varlen adapter packs them.
- ``{"kind": "attnpatch", "backend": "sage" | "sage_varlen", "kv_lengths": [...] | None, ...}``:
  ``attnpatch.dispatch_attention`` in strict mode, inside ``attnpatch.testing.emulate_device("cuda",
  capability)``; with ``kv_lengths`` a (batch, seq_kv) bool key-padding mask is passed (True = attend).

Common fields: batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, causal, scale (None = 1/sqrt(head_dim)),
dtype ("float16" | "bfloat16"), seed, capability ([major, minor], attnpatch cases), seq_stride (None, or q, k
and v as non-contiguous views with this seq stride: issue 386's int32 offsets).

Result fields: ``outcome`` ("served" | "refused" | "raised"), ``message`` (refusal or exception text),
``max_abs_error`` (max |out - ref|), ``ref_max_abs``, ``gain`` (least-squares factor g in out ~ g * ref: 1 when
right, < 1 when the output is too small), ``allclose_ratio`` (max of |out - ref| / (atol + rtol * |ref|) for
the case's ``atol``/``rtol``: <= 1 passes), ``key_mutated`` (the caller's key changed), ``max_diff_vs_contiguous``
(seq_stride cases: max |out - out of the same call on contiguous copies|, 0 when memory is addressed right),
``seconds``.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported: below, through sageattention

import ast
import contextlib
import importlib.metadata
import inspect
import json
import sys
import textwrap
import time
import traceback
from typing import Any

import torch

from tests.reference import reference_attention  # float64, no SDPA: the suite's one reference

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _is_cuda_assert(node: ast.stmt) -> bool:
    return isinstance(node, ast.Assert) and ast.unparse(node.test) == "q.is_cuda"


def without_cuda_assert(function: Any) -> Any:
    """``function`` recompiled from its own source without its ``assert q.is_cuda`` statement."""
    source = textwrap.dedent(inspect.getsource(function))
    tree = ast.parse(source)
    definition = tree.body[0]
    if not isinstance(definition, ast.FunctionDef):
        raise RuntimeError(f"{function.__qualname__} is not a plain function: refusing to rewrite it")
    kept = [node for node in definition.body if not _is_cuda_assert(node)]
    if len(kept) != len(definition.body) - 1:
        raise RuntimeError(
            f"{function.__module__}.{function.__qualname__} has {len(definition.body) - len(kept)} "
            "`assert q.is_cuda` statements, expected 1: this worker knows sageattention 1.0.x only"
        )
    definition.body = kept
    ast.increment_lineno(tree, function.__code__.co_firstlineno - 1)
    namespace: dict[str, Any] = {}
    exec(compile(tree, inspect.getsourcefile(function) or "<sageattention>", "exec"), function.__globals__, namespace)
    rewritten = namespace[function.__name__]
    rewritten.__doc__ = function.__doc__
    return rewritten


def load_sageattention() -> Any:
    """The installed sageattention with its two entry points runnable on CPU tensors."""
    import sageattention
    import sageattention.core as core

    for name in ("sageattn", "sageattn_varlen"):
        runnable = without_cuda_assert(getattr(core, name))
        setattr(core, name, runnable)
        setattr(sageattention, name, runnable)  # the package re-exports them: attnpatch calls these
    return sageattention


def _inputs(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(case.get("seed", 0))
    dtype = DTYPES[case.get("dtype", "float16")]
    batch, head_dim = case.get("batch", 1), case["head_dim"]
    heads_q, heads_kv = case.get("heads_q", 2), case.get("heads_kv", case.get("heads_q", 2))

    def normal(seq: int, heads: int) -> torch.Tensor:
        return torch.randn(batch, seq, heads, head_dim, generator=generator).to(dtype)

    query, key, value = (
        normal(case["seq_q"], heads_q),
        normal(case["seq_kv"], heads_kv),
        normal(case["seq_kv"], heads_kv),
    )
    if case.get("seq_stride"):
        query, key, value = (_strided(t, case["seq_stride"]) for t in (query, key, value))
    return query, key, value


def _strided(tensor: torch.Tensor, seq_stride: int) -> torch.Tensor:
    """``tensor`` (batch, seq, heads, head_dim) copied into a view whose seq stride is ``seq_stride`` elements.

    Like a view into a fused QKV projection, with a stride large enough to cross 2**31 elements at short
    sequences. The buffer is never filled: only the pages the view touches are ever backed by memory.
    """
    (batch, seq), head_dim = tensor.shape[:2], tensor.shape[-1]
    batch_stride = seq * seq_stride
    buffer = torch.empty(batch * batch_stride, dtype=tensor.dtype)
    view = buffer.as_strided(tensor.shape, (batch_stride, seq_stride, head_dim, 1))
    return view.copy_(tensor)


def _key_padding(case: dict[str, Any]) -> torch.Tensor | None:
    lengths = case.get("kv_lengths")
    if lengths is None:
        return None
    return torch.arange(case["seq_kv"])[None, :] < torch.tensor(lengths)[:, None]  # (batch, seq_kv), True = attend


def _compare(out: torch.Tensor, ref: torch.Tensor, case: dict[str, Any]) -> dict[str, Any]:
    out, ref = out.double(), ref.double()
    error = (out - ref).abs()
    bound = case.get("atol", 5e-2) + case.get("rtol", 5e-2) * ref.abs()
    return {
        "max_abs_error": error.max().item(),
        "ref_max_abs": ref.abs().max().item(),
        "gain": ((out * ref).sum() / (ref * ref).sum()).item(),
        "allclose_ratio": (error / bound).max().item(),
        "finite": bool(torch.isfinite(out).all()),
    }


Outcome = tuple[dict[str, Any], torch.Tensor | None]  # (result fields, the output when served)


def run_direct(sage: Any, case: dict[str, Any]) -> Outcome:
    query, key, value = _inputs(case)
    key_given = key.clone()
    causal, scale = case.get("causal", False), case.get("scale")
    if case["function"] == "sageattn":
        out = sage.sageattn(query, key, value, tensor_layout="NHD", is_causal=causal, sm_scale=scale)
        ref = reference_attention(query, key_given, value, None, causal, scale)
    else:
        batch, seq_q = query.shape[:2]
        lengths = case.get("kv_lengths") or [case["seq_kv"]] * batch
        packed_key = torch.cat([key[b, :n] for b, n in enumerate(lengths)])
        packed_value = torch.cat([value[b, :n] for b, n in enumerate(lengths)])
        cu_k = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_q = torch.arange(batch + 1, dtype=torch.int32) * seq_q
        packed_given = packed_key.clone()
        out = sage.sageattn_varlen(
            query.flatten(0, 1),
            packed_key,
            packed_value,
            cu_q,
            cu_k,
            seq_q,
            max(lengths),
            is_causal=causal,
            sm_scale=scale,
        ).unflatten(0, (batch, seq_q))
        ref = reference_attention(query, key_given, value, _key_padding({**case, "kv_lengths": lengths}), causal, scale)
        key, key_given = packed_key, packed_given
    return {"outcome": "served", "key_mutated": not torch.equal(key, key_given), **_compare(out, ref, case)}, out


def run_attnpatch(sage: Any, case: dict[str, Any]) -> Outcome:
    # ``sage`` is not called here: attnpatch finds the same, already runnable, module in sys.modules.
    import attnpatch
    from attnpatch.testing import emulate_device

    query, key, value = _inputs(case)
    key_given = key.clone()
    causal, scale, key_padding = case.get("causal", False), case.get("scale"), _key_padding(case)
    attnpatch.set_strict(True)
    with emulate_device("cuda", capability=tuple(case.get("capability", (8, 6)))):
        try:
            out = attnpatch.dispatch_attention(
                query, key, value, attn_mask=key_padding, is_causal=causal, scale=scale, backend=case["backend"]
            )
        except attnpatch.UnsupportedCall as exc:
            return {"outcome": "refused", "message": str(exc)}, None
    ref = reference_attention(query, key_given, value, key_padding, causal, scale)
    return {"outcome": "served", "key_mutated": not torch.equal(key, key_given), **_compare(out, ref, case)}, out


def run(case: dict[str, Any], sage: Any) -> dict[str, Any]:
    started = time.perf_counter()
    runner = run_direct if case["kind"] == "direct" else run_attnpatch
    try:
        result, out = runner(sage, case)
        if out is not None and case.get("seq_stride"):
            # The same call on contiguous copies of the same values: a kernel that addresses memory right
            # gives the same bits whatever the strides (the reference cannot see a few wrongly read keys).
            _, twin = runner(sage, {**case, "seq_stride": None})
            result["max_diff_vs_contiguous"] = (out.double() - twin.double()).abs().max().item()
    except Exception as exc:  # one case's failure is that case's result, not the batch's
        result = {"outcome": "raised", "message": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def main() -> None:
    cases = json.load(sys.stdin)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON answer only
        sage = load_sageattention()
        results = [run(case, sage) for case in cases]
        versions = {name: importlib.metadata.version(name) for name in ("sageattention", "triton", "torch")}
    json.dump({**versions, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
