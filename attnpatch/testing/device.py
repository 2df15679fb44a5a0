"""Device emulation: run a GPU backend's rules and adapter on CPU tensors (tests, kernels under an interpreter).

Inside ``with emulate_device("cuda", capability=(8, 6)):`` the dispatcher sees CPU tensors as tensors on device
0 of that type, a GPU of that compute capability as present, and every availability answer is recomputed. Only
these device facts change: dtypes, head dims, masks, versions, imports are checked for real, and the adapter
runs for real, on the CPU tensors. Use it with a library that computes on CPU (SageAttention's Triton kernels
under ``TRITON_INTERPRET=1``, flash-attn's reference path) or with a fake of the library; what the adapter
returns is then what the backend would return on that device, as far as the library's CPU path is faithful.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from attnpatch.core import call, registry


@contextmanager
def emulate_device(
    device_type: str = "cuda", *, capability: tuple[int, int] | None = (8, 0), rocm: bool = False
) -> Iterator[None]:
    """Treat CPU tensors as ``device_type`` tensors (CUDA ``capability``; ``rocm``: an AMD GPU) in this block.

    Process-wide (not per thread): meant for tests. Nestable; the previous emulation is restored on exit.
    """
    saved = (*call.emulated(), call.emulated_rocm())
    call.emulate(device_type, capability if device_type == "cuda" else None, rocm)
    registry.refresh()
    try:
        yield
    finally:
        call.emulate(*saved)
        registry.refresh()
