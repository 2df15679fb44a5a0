"""Per-call cost of routing on every path, each against the direct torch call doing the same work, side by side.

Run as ``python -m attnpatch bench --overhead`` or ``python benchmarks/overhead.py``. At a tiny CPU shape the
kernel takes a few microseconds, so Python overhead shows. Each round times every function for ``calls`` calls,
rounds interleave the functions, and the minimum per-call time over rounds is reported: on a loaded machine
medians swing by microseconds, minima do not. Targets (not asserted anywhere: machines are noisy): the fast path
(no mask, native) under 0.3 us added, every other path under 1 us.

Paths: no mask; a key-padding mask (batch, seq_kv); a 4-D bool mask; an additive mask; ``auto`` after its first
call of a kind; a fallback chain after its warning; a context selection; a per-module selection through a patched
diffusers processor and through a patched transformers layer (against the same layer unpatched).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attnpatch import api

FAST_TARGET_US = 0.3
TARGET_US = 1.0
REFUSES = "_overhead_refuses"  # a backend that refuses every call: the first member of the fallback chain


@dataclass
class Path:
    """One routing path: ``routed()`` and ``direct()`` do the same attention; ``target`` is in microseconds."""

    name: str
    direct: Callable[[], Any]
    routed: Callable[[], Any]
    target: float = TARGET_US
    # A context manager factory entered around this path's timing only (a selection block): left open for the
    # whole run, it would be what every other path measures too.
    scope: Callable[[], Any] | None = None


def paths(batch: int, seq: int, heads: int, head_dim: int, cleanup: list[Callable[[], Any]]) -> list[Path]:
    """The paths to measure; what must be undone afterwards (a registered backend, an open block) goes to cleanup."""
    import attnpatch
    from attnpatch.core import registry, selection

    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, head_dim) for _ in range(3))
    padding = torch.ones(batch, seq, dtype=torch.bool)
    padding[:, : seq // 4] = False  # left padding
    padding_4d = padding.view(batch, 1, 1, seq)
    bool_4d = torch.ones(seq, seq, dtype=torch.bool).tril().view(1, 1, seq, seq)
    additive = torch.zeros(1, 1, seq, seq).masked_fill(~bool_4d, float("-inf"))
    dispatch = attnpatch.dispatch_attention

    def sdpa(mask: torch.Tensor | None = None) -> Callable[[], Any]:
        # The direct call a (batch, seq, heads, head_dim) caller makes: the layout transposes are part of the work.
        def direct() -> Any:
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if mask is None:
                return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)

        return direct

    if REFUSES not in {b.name for b in registry.list_backends()}:
        registry.register_backend(REFUSES, lambda *args: args[0], devices={"nowhere"})
        cleanup.append(lambda: registry.unregister_backend(REFUSES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the chain's one fallback warning
        dispatch(q, k, v, backend=f"{REFUSES},native")

    def in_context() -> Any:
        return dispatch(q, k, v)

    found = [
        Path("no mask (fast path)", sdpa(), lambda: dispatch(q, k, v), FAST_TARGET_US),
        Path("key-padding mask (batch, seq_kv)", sdpa(padding_4d), lambda: dispatch(q, k, v, attn_mask=padding)),
        Path("4-D bool mask", sdpa(bool_4d), lambda: dispatch(q, k, v, attn_mask=bool_4d)),
        Path("additive mask", sdpa(additive), lambda: dispatch(q, k, v, attn_mask=additive)),
        Path("auto (after its first call)", sdpa(), lambda: dispatch(q, k, v, backend="auto")),
        Path("fallback chain (after its warning)", sdpa(), lambda: dispatch(q, k, v, backend=f"{REFUSES},native")),
        # The dispatcher's block itself (no patcher install), open around the path's rounds as around a pipeline call.
        Path("context selection", sdpa(), in_context, scope=lambda: selection.attention_backend("native")),
    ]
    found += _model_paths(batch, seq, cleanup)
    return found


def _model_paths(batch: int, seq: int, cleanup: list[Callable[[], Any]]) -> list[Path]:
    """A patched diffusers processor and a patched transformers layer against the same layer unpatched."""
    found = []
    try:
        import copy

        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        import attnpatch

        layer = Attention(query_dim=64, heads=2, dim_head=32).eval()
        processor: Any = AttnProcessor2_0()  # diffusers annotates set_processor with its base AttnProcessor class
        layer.set_processor(processor)
        patched = attnpatch.apply(copy.deepcopy(layer), backend="native")
        cleanup.append(lambda: attnpatch.unapply(patched))
        hidden = torch.randn(batch, seq, 64)
        found.append(Path("per-module: diffusers AttnProcessor2_0", lambda: layer(hidden), lambda: patched(hidden)))
    except Exception:  # diffusers is optional here
        pass
    try:
        import copy

        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

        import attnpatch

        config = LlamaConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
        config._attn_implementation = "sdpa"
        attention = LlamaAttention(config, layer_idx=0).eval()
        patched_attention = attnpatch.apply(copy.deepcopy(attention), backend="native")
        cleanup.append(lambda: attnpatch.unapply(patched_attention))
        hidden = torch.randn(batch, seq, 64)
        positions = LlamaRotaryEmbedding(config)(hidden, torch.arange(seq)[None])

        def unpatched() -> Any:
            return attention(hidden, positions, None)

        def routed() -> Any:
            return patched_attention(hidden, positions, None)

        found.append(Path("per-module: transformers LlamaAttention (sdpa)", unpatched, routed))
    except Exception:  # transformers is optional here, and its layer signature changes between versions
        pass
    return found


def measure(
    batch: int = 1, seq: int = 16, heads: int = 2, head_dim: int = 32, rounds: int = 30, calls: int = 300
) -> dict[str, dict[str, float]]:
    """Return path name -> {"direct_us", "routed_us", "added_us", "target_us"}: minima over interleaved rounds."""
    cleanup: list[Callable[[], Any]] = []
    try:
        return _measure(paths(batch, seq, heads, head_dim, cleanup), rounds, calls)
    finally:
        for undo in reversed(cleanup):
            undo()


def _measure(found: list[Path], rounds: int, calls: int) -> dict[str, dict[str, float]]:
    samples: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for path in found:  # warm-up: first calls import backends and fill caches
            with path.scope() if path.scope is not None else contextlib.nullcontext():
                for _ in range(50):
                    path.direct()
                    path.routed()
        for _ in range(rounds):
            for path in found:
                with path.scope() if path.scope is not None else contextlib.nullcontext():
                    for side, fn in (("direct", path.direct), ("routed", path.routed)):
                        # The direct side runs as without attnpatch: F.scaled_dot_product_attention is torch's own
                        # (installed, the redirect's wrapper would add its passthrough to every unpatched call).
                        with api.sdpa_redirect_paused() if side == "direct" else contextlib.nullcontext():
                            start = time.perf_counter_ns()
                            for _ in range(calls):
                                fn()
                            elapsed = (time.perf_counter_ns() - start) / calls / 1e3
                        samples.setdefault((path.name, side), []).append(elapsed)
    result = {}
    for path in found:
        direct, routed = min(samples[(path.name, "direct")]), min(samples[(path.name, "routed")])
        result[path.name] = {
            "direct_us": direct,
            "routed_us": routed,
            "added_us": routed - direct,
            "target_us": path.target,
        }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnpatch bench --overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="1,16,2,32", help="B,S,H,D of q/k/v (default: 1,16,2,32)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=300, help="calls per function per round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    opts = parser.parse_args(list(argv) if argv is not None else None)
    try:
        batch, seq, heads, head_dim = (int(x) for x in opts.shape.split(","))
    except ValueError:
        parser.error(f"--shape {opts.shape!r}: expected four integers B,S,H,D such as 1,16,2,32")
    torch.set_num_threads(opts.threads)
    result = measure(batch, seq, heads, head_dim, opts.rounds, opts.calls)
    print(
        f"added per call over the direct torch call doing the same work, q/k/v {batch}x{seq}x{heads}x{head_dim} "
        f"(B,S,H,D), {opts.threads} thread(s), minimum over {opts.rounds} interleaved rounds of {opts.calls} calls"
    )
    width = max(len(n) for n in result)
    for name, r in result.items():
        verdict = "ok" if r["added_us"] < r["target_us"] else "over target"
        print(
            f"  {name:<{width}}  direct {r['direct_us']:7.2f} us  routed {r['routed_us']:7.2f} us  "
            f"added {r['added_us']:+6.2f} us  (target < {r['target_us']:g} us: {verdict})"
        )
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(
                {"shape": [batch, seq, heads, head_dim], "threads": opts.threads, "results": result}, fh, indent=2
            )
    return 0
