"""Plumbing shared by the kernel-library backends (flash, sage, xformers, aiter, hub, xla, npu).

A private module: the registry imports only the public modules of ``attnpatch.backends``, so nothing here
registers a backend. What lives here:

- availability reasons that never import the kernel package (``python -m attnpatch list`` must stay cheap and
  must not crash on a broken CUDA extension), and import-on-first-use that turns an import failure into a reason;
- one ``torch.library`` custom op that every external kernel runs through under ``torch.compile``, so a compiled
  model never graph-breaks on a pybind kernel, with a backward that replays the library's own autograd;
- packing of key-padding masks for the varlen kernels, with no ``.item()`` (max_seqlen is the padded length).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from attnpatch import masks, registry
from attnpatch.registry import CallSpec

HALF = frozenset({torch.float16, torch.bfloat16})

# (query, key, value, attn_mask, dropout_p, is_causal, scale) -> out, in the dispatcher's (B, S, H, D) layout.
# attn_mask is the dispatcher's normalised mask (or None); is_causal is top-left and never set with a mask.
KernelFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float, bool, float | None], torch.Tensor
]


F = TypeVar("F", bound=Callable[..., Any])


def constant_for_compile(function: F) -> F:
    """Mark ``function`` as returning a constant for torch.compile, which then calls it instead of tracing it.

    What ``torch.compiler.assume_constant_result`` does (it sets this attribute), without the import of
    torch._dynamo it starts with: three seconds at backend registration, paid by every process, compiled or not.
    For facts fixed for the life of the process: package availability, a GPU's compute capability.
    """
    function._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return function


# ----- availability ---------------------------------------------------------------------------------------------


def package_reasons(
    module: str, pip_name: str, min_version: str | None = None, extra: str = "", hint: str | None = None
) -> list[str]:
    """registry.package_reasons, plus: ``hint`` replaces "pip install ..." for packages pip cannot install, and
    modules without distribution metadata are judged by their ``__version__``.

    A package imported from a source tree, or a test fake, has no metadata; once it is imported its
    ``__version__`` is the only version there is. Imports nothing.
    """
    if hint is not None and not installed(module):
        return [f"{module} not installed: {hint}"]
    reasons = registry.package_reasons(module, pip_name, min_version, extra)
    if reasons or min_version is None or _has_metadata(pip_name):
        return reasons
    version = getattr(sys.modules.get(module), "__version__", None)
    if isinstance(version, str) and registry._version_tuple(version) < registry._version_tuple(min_version):
        return [f"{module} version {version} < {min_version}: pip install -U '{pip_name}>={min_version}'{extra}"]
    return []


def installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _has_metadata(pip_name: str) -> bool:
    try:
        importlib.metadata.version(pip_name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def device_reasons(kind: str) -> list[str]:
    """Why this process has no device of ``kind`` ("cuda": an NVIDIA or AMD GPU, "rocm": an AMD GPU).

    The single place the kernel backends ask whether a GPU is present. Tests that drive an adapter with a fake
    library on CPU tensors replace this function (and the per-call device, see tests/test_kernel_backends.py);
    every other check keeps running for real.
    """
    reasons = registry.cuda_reasons()
    if kind == "rocm" and getattr(torch.version, "hip", None) is None:
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
    # The registry's cached lookup, so tests that monkeypatch it see one capability everywhere; a constant for
    # torch.compile, which runs it eagerly instead of tracing into torch.cuda.
    return registry._compute_capability(index)


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


# ----- the custom op --------------------------------------------------------------------------------------------

_kernels: dict[str, KernelFn] = {}


def external(name: str, kernel: KernelFn) -> registry.BackendFn:
    """Make the backend function for ``kernel``, a call into an external library.

    Eager calls go straight to ``kernel``: a custom op costs ~100 us of Python dispatch per call, several percent
    of a FlashAttention call at diffusion shapes. Under torch.compile the call goes through the custom op
    ``attnpatch::external_attention`` instead, which dynamo does not trace into, so a pybind kernel causes no
    graph break.
    """
    _kernels[name] = kernel

    def run(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
        enable_gqa: bool,
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.attnpatch.external_attention(
                query, key, value, attn_mask, dropout_p, is_causal, scale, name
            )
        return kernel(query, key, value, attn_mask, dropout_p, is_causal, scale)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = kernel.__doc__
    return run


_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, bool is_causal, float? scale, "
    "str kernel)"
)


@torch.library.custom_op("attnpatch::external_attention", mutates_args=(), schema=_SCHEMA + " -> Tensor")
def _external_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    kernel: str,
) -> torch.Tensor:
    # Contiguous, as the fake below promises (the kernels return contiguous outputs already: no copy for them).
    return _kernels[kernel](query, key, value, attn_mask, dropout_p, is_causal, scale).contiguous()


@_external_attention.register_fake
def _external_attention_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    kernel: str,
) -> torch.Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@torch.library.custom_op(
    "attnpatch::external_attention_backward",
    mutates_args=(),
    schema="(Tensor grad, " + _SCHEMA[1:] + " -> (Tensor, Tensor, Tensor)",
)
def _external_attention_backward(
    grad: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Replay the forward through the library's own autograd and differentiate it: the only backward every
    # library documents (their low-level backward functions change signature between minor versions).
    with _autograd_enabled(), torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
        out = _kernels[kernel](q, k, v, attn_mask, dropout_p, is_causal, scale)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return dq, dk, dv


@_external_attention_backward.register_fake
def _external_attention_backward_fake(
    grad: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _autograd_enabled() -> Any:
    # A custom op's implementation runs with the autograd dispatch keys excluded, so torch.enable_grad() alone
    # records nothing there. Re-include only the autograd keys (not autocast, which is excluded too and would
    # silently downcast the replay).
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (
        torch._C.DispatchKey.AutogradFunctionality,
        torch._C.DispatchKey.AutogradOther,
        torch._C.DispatchKey.AutogradNestedTensor,
    ):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    query, key, value, attn_mask, dropout_p, is_causal, scale, kernel = inputs
    ctx.save_for_backward(query, key, value, attn_mask)
    ctx.args = (dropout_p, is_causal, scale, kernel)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    query, key, value, attn_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnpatch.external_attention_backward(grad, query, key, value, attn_mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_external_attention.register_autograd(_backward, setup_context=_setup_context)


# ----- varlen packing -------------------------------------------------------------------------------------------


def cu_seqlens(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """(batch + 1,) int32 offsets of ``batch`` sequences of ``seq`` tokens each."""
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seq


def pack_keys(
    key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values of the attended positions only, for a varlen kernel.

    key: (batch, seq_kv, heads_kv, head_dim); attn_mask: None or a key-padding mask (batch|1, 1, 1, seq_kv), bool,
    True = attend, at any positions (left padding included). Returns key (total_k, heads_kv, head_dim), value
    (total_k, heads_kv, head_dim_v) and cu_seqlens_k (batch + 1,) int32. The caller passes seq_kv as max_seqlen_k:
    an upper bound is what the kernels need, and the true maximum would cost a device-to-host sync.
    """
    batch, seq_kv = key.shape[0], key.shape[1]
    if attn_mask is None:
        return key.flatten(0, 1), value.flatten(0, 1), cu_seqlens(batch, seq_kv, key.device)
    keep = attn_mask.reshape(attn_mask.shape[0], seq_kv).expand(batch, seq_kv)
    counts = keep.sum(dim=1, dtype=torch.int32)
    offsets = torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
    index = keep.flatten().nonzero().squeeze(1)
    return key.flatten(0, 1).index_select(0, index), value.flatten(0, 1).index_select(0, index), offsets


def varlen_output(out: torch.Tensor, batch: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch * seq_q, heads, head_dim_v) from a varlen kernel -> (batch, seq_q, heads, head_dim_v).

    Queries are never packed (every query row is computed, as SDPA does with a key-padding mask), so this is a
    reshape; a batch entry with no key to attend gets 0, whatever the kernel wrote for it.
    """
    return masks.zero_fully_masked(out.unflatten(0, (batch, -1)), attn_mask)
