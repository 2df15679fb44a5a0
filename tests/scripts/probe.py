"""Runs one tiny attention model and prints how attnpatch routed it: ``routed=N served=<backends> out=<sum>``.

    python probe.py                     a diffusers Attention layer (legacy processor, F.sdpa inside)
    python probe.py transformers        a tiny Llama (transformers' attention interface)
    python probe.py children [KIND...]  the diffusers probe in a child of each KIND, then here ("main: ..."):
                                        fork, spawn, forkserver (multiprocessing), subprocess (sys.executable)

The library is imported before attnpatch.core.dispatch, so with ATTNPATCH_BACKEND set it is the library import that
activates attnpatch. Without attnpatch active nothing is routed (routed=0) and ``out`` is the library's own result.
"""

import multiprocessing
import subprocess
import sys


def run_probe(library: str = "diffusers") -> str:
    import torch

    if library == "transformers":
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        torch.manual_seed(0)
        model = LlamaModel(config).eval()
        inputs = (torch.tensor([[1, 5, 6, 7, 8]]),)
    else:
        from diffusers.models.attention_processor import Attention

        torch.manual_seed(0)
        model = Attention(query_dim=32, heads=2, dim_head=16).eval()
        inputs = (torch.randn(1, 8, 32),)
    from attnpatch.core import hooks

    served = []
    observer = lambda record: served.append(record.served)  # noqa: E731
    hooks.add_observer(observer)
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        hooks.remove_observer(observer)
    out = out if isinstance(out, torch.Tensor) else out[0]
    return f"routed={len(served)} served={','.join(sorted(set(served))) or '-'} out={out.double().sum().item():.6f}"


KINDS = ("fork", "spawn", "forkserver", "subprocess")


def children(kinds: list[str]) -> None:
    # This process runs its own probe last: a fork after torch has run an op on CPU threads can hang the child.
    for kind in kinds or KINDS:
        if kind == "subprocess":
            child = subprocess.run([sys.executable, __file__], capture_output=True, text=True, check=True)
            line = child.stdout.strip()
        else:
            with multiprocessing.get_context(kind).Pool(1) as pool:
                line = pool.apply(run_probe)
        print(f"{kind}: {line}", flush=True)
    print(f"main: {run_probe()}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["children"]:
        children(sys.argv[2:])
    else:
        print(run_probe(*sys.argv[1:]), flush=True)
