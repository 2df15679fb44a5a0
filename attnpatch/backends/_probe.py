"""Availability and per-call facts for the kernel-library backends: packages, versions, devices, imports.

Nothing here imports a kernel package to answer whether it is available (``python -m attnpatch list`` must stay
cheap and must not crash on a broken CUDA extension); a package is imported at the first call a backend is asked
to serve, and an import failure becomes a reason. Device facts honour device emulation
(:func:`attnpatch.testing.emulate_device`), so the rules of a GPU backend can be tested on a CPU.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from attnpatch.core import capabilities
from attnpatch.core.call import CallSpec, emulated, emulated_rocm
from attnpatch.core.versions import installed, installed_version, older_than

HALF = frozenset({torch.float16, torch.bfloat16})
# What the fused CUDA kernels (flash-attn, SageAttention, AITER) share: fp16/bf16 on CUDA, one head dim for query,
# key and value. Each family replaces the rest.
FUSED_CUDA = capabilities.Capabilities(devices=frozenset({"cuda"}), dtypes=HALF, same_v_head_dim=True)

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
    module: str,
    pip_name: str,
    min_version: str | None = None,
    extra: str = "",
    hint: str | None = None,
    upgrade: str | None = None,
) -> list[str]:
    """Reasons a kernel package is unusable: not installed, or older than ``min_version``. Imports nothing.

    ``hint`` replaces "pip install ..." (in both reasons) for packages a plain pip command cannot install or would
    install wrongly (a build from source; a package that must match the torch release). A module without
    distribution metadata (imported from a source tree, or a test fake) is judged by its ``__version__`` once it
    is imported. ``upgrade`` replaces the fix of the too-old reason only (a newer release the index does not serve).
    """
    if not installed(module):
        return [f"{module} not installed: {hint if hint is not None else f'pip install {pip_name}{extra}'}"]
    if min_version is None:
        return []
    distribution = pip_name.split("[")[0].split("=")[0].split(">")[0]
    version = installed_version(module, distribution)
    if version is not None and older_than(version, min_version):
        fix = upgrade or hint or f"pip install -U '{pip_name}>={min_version}'{extra}"
        return [f"{module} version {version} < {min_version}: {fix}"]
    return []


def torch_release() -> str:
    """The installed torch's release, "2.13.0" for "2.13.0+cu128": what packages built for one torch must match."""
    return torch.__version__.split("+")[0]


def cuda_reasons() -> list[str]:
    """Why this process has no CUDA device (none while a CUDA device is emulated)."""
    if emulated()[0] == "cuda":
        return []
    if not torch.cuda.is_available():
        return ["needs a CUDA GPU: torch.cuda.is_available() is False"]
    return []


def device_reasons(kind: str) -> list[str]:
    """Why this process has no device of ``kind`` ("cuda": an NVIDIA or AMD GPU, "rocm": an AMD GPU, "nvidia": an
    NVIDIA GPU).

    The single place the kernel backends ask whether a GPU is present; an emulated device counts as present
    (see :func:`attnpatch.testing.emulate_device`), and so does its ROCm-ness when "rocm" is emulated. An AMD GPU
    reports a compute capability too (9.4 for MI300), so a kernel built for NVIDIA only must ask for "nvidia".
    """
    reasons = cuda_reasons()
    if kind == "rocm" and not emulated_rocm() and getattr(torch.version, "hip", None) is None:
        reasons.append("needs a ROCm build of torch (torch.version.hip is None): this kernel runs on AMD GPUs")
    if kind == "nvidia" and amd_gpu():
        reasons.append(NOT_NVIDIA)
    return reasons


NOT_NVIDIA = "needs an NVIDIA GPU: this is a ROCm build of torch (torch.version.hip is set)"


def amd_gpu() -> bool:
    """Whether the GPU torch sees is an AMD one (a ROCm torch, or an emulated ROCm device)."""
    if emulated()[0] == "cuda":
        return emulated_rocm()
    return getattr(torch.version, "hip", None) is not None


def requires(
    module: str,
    pip_name: str,
    min_version: str | None = None,
    extra: str = "",
    device: str | None = "cuda",
    hint: str | None = None,
    upgrade: str | None = None,
) -> Callable[[], list[str]]:
    """A ``Backend.requires`` callable: the package (and version) plus the device (None: checked per call).

    Availability is computed once, lazily, possibly while torch.compile traces the first call; package metadata
    cannot be traced, so dynamo runs this eagerly and keeps the result as a constant (it is one, per process).
    """

    @constant_for_compile
    def reasons() -> list[str]:
        found = package_reasons(module, pip_name, min_version, extra, hint, upgrade)
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
        return [import_failure(module, exc)]
    return []


# xformers 0.0.31+ (ops/fmha/flash.py): an importable flash_attn outside the range it was built against fails the
# whole `import xformers.ops` with "Requires Flash-Attention version >=2.7.1,<=2.8.4 but got 2.6.3."
_FLASH_RANGE = re.compile(r"Requires Flash-Attention version (?P<range>[<>=!~][^ ]*) but got (?P<got>[^ ]+?)\.?$")
# The dynamic loader's message for a shared library that is not on the search path.
_MISSING_LIBRARY = re.compile(r"(?P<library>lib[\w.+-]+\.so[\w.]*): cannot open shared object file")
_XLA_KERNELS = "torch_xla.experimental.custom_kernel"


def import_failure(module: str, exc: BaseException) -> str:
    """The reason ``module`` failed to import with ``exc``: the library's own message, then the fix for its cause.

    Each cause has its own fix: "reinstall it for torch X" helps only a build for another torch.
    """
    text = f"{module} failed to import ({type(exc).__name__}: {exc})"
    message = str(exc)
    flash_range = _FLASH_RANGE.search(message)
    library = _MISSING_LIBRARY.search(message)
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if "undefined symbol" in message:
        # A C++ symbol of another torch (or CUDA) build: the extension was compiled against other headers.
        return f"{text}: built for another torch: reinstall it for torch {torch.__version__}"
    if flash_range is not None:
        return (
            f"{text}: xformers refuses the installed flash-attn {flash_range['got']}; set "
            f"XFORMERS_IGNORE_FLASH_VERSION_CHECK=1, or pip install 'flash-attn{flash_range['range']}' "
            "--no-build-isolation"
        )
    if library is not None:
        cuda = getattr(torch.version, "cuda", None)
        runtime = f"torch {torch.__version__} (CUDA {cuda})" if cuda else f"torch {torch.__version__} (no CUDA)"
        return (
            f"{text}: the CUDA library {library['library']} is not found: this build needs a CUDA runtime that "
            f"{runtime} does not bring; install a build of {module.split('.')[0]} for {runtime}"
        )
    if missing == _XLA_KERNELS and module == _XLA_KERNELS:
        release = torch_release()
        return (
            f"{text}: torch_xla {_xla_version()} has no experimental/custom_kernel.py (added in 2.3; its "
            "flash_attention has sm_scale and a backward from 2.4): torch_xla >= 2.4 is needed, the release of "
            f"your torch: pip install 'torch=={release}' 'torch-xla[tpu]=={release}'"
        )
    if missing == "flash_attn_2_cuda":
        # flash-attn's Python files without its compiled extension (a failed or CPU-only build); xformers imports
        # flash_attn whenever it is importable, so this breaks xformers too.
        return (
            f"{text}: flash-attn is installed without its CUDA extension: reinstall it for torch "
            f"{torch.__version__} (pip install flash-attn --no-build-isolation), or pip uninstall flash-attn"
        )
    if missing is not None and missing.split(".")[0] != module.split(".")[0]:
        # One of the library's own dependencies (cutlass for FlashAttention-4, triton for SageAttention).
        return f"{text}: its dependency {missing} is missing: reinstall {module.split('.')[0]} with its dependencies"
    return text


def _xla_version() -> str:
    found = installed_version("torch_xla", "torch-xla")
    return found if found is not None else "(version unknown)"


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
