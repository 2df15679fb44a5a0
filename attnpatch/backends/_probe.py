"""Availability and per-call facts for the kernel-library backends: packages, versions, devices, imports.

Nothing here imports a kernel package to answer whether it is available (``python -m attnpatch list`` must stay
cheap and must not crash on a broken CUDA extension); a package is imported at the first call a backend is asked
to serve, and an import failure becomes a reason. Device facts honour device emulation
(:func:`attnpatch.testing.emulate_device`), so the rules of a GPU backend can be tested on a CPU.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from attnpatch.core import capabilities
from attnpatch.core.call import CallSpec, emulated, emulated_rocm
from attnpatch.core.versions import installed, installed_version, version_tuple

HALF = frozenset({torch.float16, torch.bfloat16})

F = TypeVar("F", bound=Callable[..., Any])


def constant_for_compile(function: F) -> F:
    """Mark ``function`` as returning a constant for torch.compile, which then calls it instead of tracing it.

    What ``torch.compiler.assume_constant_result`` does (it sets this attribute), without the import of
    torch._dynamo it starts with: three seconds at backend registration, paid by every process, compiled or not.
    For facts fixed for the life of the process: package availability, a GPU's compute capability.
    """
    function._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return function


def package_reasons(
    module: str, pip_name: str, min_version: str | None = None, extra: str = "", hint: str | None = None
) -> list[str]:
    """Reasons a kernel package is unusable: not installed, or older than ``min_version``. Imports nothing.

    ``hint`` replaces "pip install ..." for packages pip cannot install. A module without distribution metadata
    (imported from a source tree, or a test fake) is judged by its ``__version__`` once it is imported.
    """
    if not installed(module):
        return [f"{module} not installed: {hint if hint is not None else f'pip install {pip_name}{extra}'}"]
    if min_version is None:
        return []
    distribution = pip_name.split("[")[0].split("=")[0].split(">")[0]
    version = installed_version(module, distribution)
    if version is not None and version_tuple(version) < version_tuple(min_version):
        return [f"{module} version {version} < {min_version}: pip install -U '{pip_name}>={min_version}'{extra}"]
    return []


def cuda_reasons() -> list[str]:
    """Why this process has no CUDA device (none while a CUDA device is emulated)."""
    if emulated()[0] == "cuda":
        return []
    if not torch.cuda.is_available():
        return ["needs a CUDA GPU: torch.cuda.is_available() is False"]
    return []


def device_reasons(kind: str) -> list[str]:
    """Why this process has no device of ``kind`` ("cuda": an NVIDIA or AMD GPU, "rocm": an AMD GPU).

    The single place the kernel backends ask whether a GPU is present; an emulated device counts as present
    (see :func:`attnpatch.testing.emulate_device`), and so does its ROCm-ness when "rocm" is emulated.
    """
    reasons = cuda_reasons()
    if kind == "rocm" and not emulated_rocm() and getattr(torch.version, "hip", None) is None:
        reasons.append("needs a ROCm build of torch (torch.version.hip is None): this kernel runs on AMD GPUs")
    return reasons


def requires(
    module: str,
    pip_name: str,
    min_version: str | None = None,
    extra: str = "",
    device: str | None = "cuda",
    hint: str | None = None,
) -> Callable[[], list[str]]:
    """A ``Backend.requires`` callable: the package (and version) plus the device (None: checked per call).

    Availability is computed once, lazily, possibly while torch.compile traces the first call; package metadata
    cannot be traced, so dynamo runs this eagerly and keeps the result as a constant (it is one, per process).
    """

    @constant_for_compile
    def reasons() -> list[str]:
        found = package_reasons(module, pip_name, min_version, extra, hint)
        return found + (device_reasons(device) if device is not None else [])

    return reasons


@constant_for_compile
def compute_capability(index: int | None) -> tuple[int, int]:
    # A constant for torch.compile, which runs it eagerly instead of tracing into torch.cuda.
    return capabilities.compute_capability(index)


# ----- import on first use -------------------------------------------------------------------------------------


def lib(name: str) -> Any:
    """The imported module ``name``, imported on first use.

    Looked up in sys.modules on every call instead of being cached here, so that a package replaced in
    sys.modules (a test fake, a reload) is the one that runs.
    """
    return sys.modules.get(name) or importlib.import_module(name)


def import_reasons(module: str, call: CallSpec) -> list[str]:
    """Why ``module`` cannot be imported (a broken build: ABI mismatch, missing CUDA library); [] once imported.

    Runs at the first call a backend is asked to serve, never while listing backends. A traced region cannot
    import, so under torch.compile the import is left to the custom op, which runs at execution time.
    """
    if module in sys.modules or call.compiling:
        return []
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken kernel build must fall back, not crash the model
        return [f"{module} failed to import ({type(exc).__name__}: {exc}); reinstall it for torch {torch.__version__}"]
    return []


def library_check(
    module: str, *more: Callable[[CallSpec], list[str]], replayed: bool = True
) -> Callable[[CallSpec], list[str]]:
    """The per-call ``check`` of a backend that calls ``module``: it must import, plus the ``more`` checks.

    ``replayed``: the backend runs through the custom op under torch.compile (see ``external``), whose backward
    replays the forward, so compiled dropout with a backward pass is refused.
    """

    def check(call: CallSpec) -> list[str]:
        reasons = import_reasons(module, call) + (compiled_dropout_reasons(call) if replayed else [])
        return reasons + [reason for extra in more for reason in extra(call)]

    return check


def capability_in(call: CallSpec, allowed: Iterable[tuple[int, int]], why: str) -> list[str]:
    """A reason unless the CUDA device's compute capability is one of ``allowed`` (for kernels built per arch)."""
    if call.device_type != "cuda":
        return []  # the device reason is given by the capabilities already
    allowed = tuple(allowed)
    cc = compute_capability(call.device_index)
    if cc in allowed:
        return []
    names = ", ".join(f"{major}.{minor}" for major, minor in allowed)
    return [f"runs on compute capability {names} ({why}), found {cc[0]}.{cc[1]}"]


def same_length_causal(call: CallSpec, library: str) -> list[str]:
    """For kernels documented as causal only when seq_q == seq_kv (SageAttention)."""
    if call.is_causal and call.seq_q != call.seq_kv:
        return [f"{library} supports is_causal only when seq_q == seq_kv, got {call.seq_q} != {call.seq_kv}"]
    return []


def compiled_dropout_reasons(call: CallSpec) -> list[str]:
    # Under torch.compile the backward replays the forward (see _backward); a replay draws a new dropout mask,
    # so the gradients would not match the forward. Eager calls use the library's own backward and are fine.
    if call.compiling and call.needs_grad and call.dropout:
        return [
            "dropout with a backward pass is not served under torch.compile (the replayed forward would draw "
            "another dropout mask); set dropout_p=0 or run this module eagerly"
        ]
    return []


def last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with stride 1 in its last dim (what every fused kernel assumes), copying only when needed."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def deterministic() -> bool:
    """Whether the user asked torch for deterministic algorithms (forwarded to kernels that have the switch)."""
    return torch.are_deterministic_algorithms_enabled()
