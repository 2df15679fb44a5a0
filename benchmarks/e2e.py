"""End-to-end cost of routing: tiny SD and Flux pipelines and Llama generate, patched with `native` vs unpatched.

    python benchmarks/e2e.py [--rounds 15] [--runs 3] [--models sd,flux,llama] [--threads 1] [--json out.json]

Each round runs every model unpatched (no attnpatch wrapper installed at all) and after
``attnpatch.apply(model, backend="native")``, alternating which goes first, so slow phases of a busy machine hit
both alike; after each switch one untimed run refills caches, then the mean of ``--runs`` runs is one sample.
Reported per model: min and median seconds of each, and the ratios patched / unpatched (target <= 1.01). The
tiny models make the Python around each attention call as large a share of the run as it can be; real models
spend far more time inside the kernels, so their ratio is closer to 1. On a busy machine trust the min ratio:
medians swing by several percent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def measure(models: Sequence[str], rounds: int, steps: int, tokens: int, runs: int = 3) -> dict[str, dict[str, float]]:
    import attnpatch
    from attnpatch.cli import demo

    jobs = demo.workloads(steps=steps, tokens=tokens)
    results = {}
    for name in models:
        job = jobs[name]
        model = job.build()
        job.run(model)  # warm-up: first-call costs (allocations, lazy inits) out of the timed rounds
        times: dict[str, list[float]] = {"unpatched": [], "native": []}
        for i in range(rounds):
            order = ["unpatched", "native"] if i % 2 == 0 else ["native", "unpatched"]
            for variant in order:
                if variant == "native":
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        attnpatch.apply(model, backend="native")
                job.run(model)  # untimed: the first run after apply/unapply refills caches; a real run is long
                began = time.perf_counter()
                for _ in range(runs):  # a round's sample is the mean of a few runs: single runs swing by 10%+
                    job.run(model)
                times[variant].append((time.perf_counter() - began) / runs)
                if variant == "native":
                    attnpatch.unapply(model)
        base, routed = times["unpatched"], times["native"]
        results[name] = {
            "unpatched_min_s": min(base),
            "unpatched_median_s": statistics.median(base),
            "native_min_s": min(routed),
            "native_median_s": statistics.median(routed),
            "ratio_min": min(routed) / min(base),
            "ratio_median": statistics.median(routed) / statistics.median(base),
        }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per variant per round (their mean is a sample)")
    parser.add_argument("--models", default="sd,flux,llama")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per pipeline run")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per Llama generate")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH")
    opts = parser.parse_args(argv)
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    models = [m.strip() for m in opts.models.split(",") if m.strip()]
    results = measure(models, opts.rounds, opts.steps, opts.tokens, opts.runs)
    print(
        f"end-to-end, patched with native vs unpatched; {opts.rounds} interleaved rounds of {opts.runs} runs, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(
        f"  {'model':<6} {'unpatched min/median ms':>24} {'native min/median ms':>22} {'ratio min':>10} {'median':>7}"
    )
    for name, r in results.items():
        print(
            f"  {name:<6} {r['unpatched_min_s'] * 1e3:11.2f} / {r['unpatched_median_s'] * 1e3:8.2f}"
            f" {r['native_min_s'] * 1e3:9.2f} / {r['native_median_s'] * 1e3:8.2f}"
            f" {r['ratio_min']:10.3f} {r['ratio_median']:7.3f}"
        )
    print("target: ratio <= 1.01")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"rounds": opts.rounds, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
