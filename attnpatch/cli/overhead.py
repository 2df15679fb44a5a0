"""Per-call cost of routing: ``dispatch_attention`` (native) vs a direct SDPA call, side by side.

Run as ``python -m attnpatch bench --overhead`` or ``python benchmarks/overhead.py``. At a tiny CPU shape the
kernel takes a few microseconds, so Python overhead shows. Each round times every function for ``calls``
calls, rounds interleave the functions, and the minimum per-call time over rounds is reported: on a loaded
machine medians swing by microseconds, minima do not.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def candidates() -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> f(q, k, v) on (B, S, H, D) tensors, each doing the same attention."""
    from attnpatch.core.dispatch import dispatch_attention

    def direct_bhsd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def direct_with_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    fns: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "F.sdpa (B,H,S,D), no layout change": direct_bhsd,
        "F.sdpa + layout transposes": direct_with_layout,
        "attnpatch.dispatch_attention (native)": dispatch_attention,
    }
    try:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
    except Exception:  # diffusers is optional: compare against it only when present
        pass
    else:
        fns["diffusers dispatch_attention_fn (native)"] = dispatch_attention_fn
    return fns


def measure(
    batch: int = 1, seq: int = 16, heads: int = 2, head_dim: int = 32, rounds: int = 30, calls: int = 300
) -> dict[str, dict[str, float]]:
    """Return name -> {"min_us", "median_us"} per call, interleaved over ``rounds``."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, head_dim) for _ in range(3))
    fns = candidates()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up: first calls import backends and fill caches
            for _ in range(50):
                fn(q, k, v)
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter_ns()
                for _ in range(calls):
                    fn(q, k, v)
                samples[name].append((time.perf_counter_ns() - start) / calls / 1000.0)
    result = {}
    for name, values in samples.items():
        values.sort()
        result[name] = {"min_us": values[0], "median_us": values[len(values) // 2]}
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
    base = result["F.sdpa + layout transposes"]["min_us"]
    print(
        f"per-call time, q/k/v {batch}x{seq}x{heads}x{head_dim} (B,S,H,D), {opts.threads} thread(s), "
        f"min (median) over {opts.rounds} interleaved rounds of {opts.calls} calls"
    )
    width = max(len(n) for n in result)
    for name, r in result.items():
        print(f"  {name:<{width}}  {r['min_us']:7.2f} us ({r['median_us']:6.2f})  {r['min_us'] - base:+6.2f} us")
    print("last column: added over F.sdpa with the same layout transposes (target for attnpatch: < 1 us)")
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(
                {"shape": [batch, seq, heads, head_dim], "threads": opts.threads, "results": result}, fh, indent=2
            )
    return 0
