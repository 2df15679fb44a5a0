"""A torchrun worker (gloo, CPU): each rank runs the diffusers probe; rank 0 prints every rank's line.

torchrun --standalone --nproc_per_node 2 torchrun_probe.py
"""

import os
import sys

import torch.distributed as dist
from probe import run_probe

if __name__ == "__main__":
    dist.init_process_group("gloo")
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, f"rank {dist.get_rank()}: {run_probe()}")
    if dist.get_rank() == 0:
        print("\n".join(lines), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    # gloo's threads can abort the interpreter's own teardown ("terminate called without an active exception",
    # SIGABRT; about one run in five on a loaded 2-core machine, with or without attnpatch): leave without it.
    os._exit(0)
