"""The one way a built-in backend is declared (:func:`define`), and the custom op external kernels run through.

A backend family's file calls :func:`define` once per backend, at import: name, function, capabilities,
availability, per-call check, aliases. ``kernel=True`` marks a call into an external library (flash-attn, sage,
xformers, aiter, a Hub kernel): eager calls go straight to it, while under torch.compile they go through the
``attnpatch::external_attention`` custom op, which dynamo does not trace into, so a pybind kernel causes no graph
break; its backward replays the library's own autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from attnpatch.core import registry
from attnpatch.core.call import BackendFn, CallSpec, ExtraFn, SdpaArgs
from attnpatch.core.capabilities import ACCEPT_ALL, Capabilities

if TYPE_CHECKING:
    from typing_extensions import Unpack


def define(
    name: str,
    fn: BackendFn,
    *,
    family: str,
    description: str,
    caps: Capabilities = ACCEPT_ALL,
    requires: Callable[[], list[str]] | None = None,
    check: Callable[[CallSpec], list[str]] | None = None,
    aliases: Iterable[str] = (),
    kernel: bool = False,
    extra_fn: ExtraFn | None = None,
    fn_bhsd: BackendFn | None = None,
    is_sdpa: bool = False,
) -> registry.Backend:
    """Declare and register the built-in backend ``name``.

    fn: the backend function (calling convention in :mod:`attnpatch.core.call`); with ``kernel=True`` a call into
        an external library, wrapped so that torch.compile sees a custom op.
    requires: why the backend cannot run in this process at all (package, version, device), computed once.
    check: why it cannot serve one call, beyond what ``caps`` says.
    extra_fn: the function for calls with the later arguments ``caps`` declares (softcap, window, sinks,
        return_lse, as keywords); default ``fn``, which then takes them.
    fn_bhsd: ``fn`` for (batch, heads, seq, head_dim) tensors, if the kernel takes that layout itself (SDPA).
    is_sdpa: the backend is torch's SDPA with the caller's arguments (``Backend.is_sdpa``).
    """
    if kernel:
        # The later arguments reach an external kernel in eager calls only (the custom op's schema has none).
        extra_fn, check = extra_fn or fn, _with_compiled_extras_refused(check)
    backend = registry.Backend(
        name,
        external(name, fn) if kernel else fn,
        family=family,
        caps=caps,
        requires=requires,
        check=check,
        builtin=True,
        description=description,
        extra_fn=extra_fn,  # type: ignore[arg-type]
        fn_bhsd=fn_bhsd,
        is_sdpa=is_sdpa,
    )
    return registry.register(backend, aliases=aliases)


def _with_compiled_extras_refused(check: Callable[[CallSpec], list[str]] | None) -> Callable[[CallSpec], list[str]]:
    def checked(call: CallSpec) -> list[str]:
        reasons = check(call) if check is not None else []
        if call.compiling and (call.softcap or call.window or call.sinks or call.return_lse):
            reasons.append("takes softcap, window, sinks and return_lse in eager calls only, not under torch.compile")
        return reasons

    return checked


_kernels: dict[str, BackendFn] = {}


def external(name: str, kernel: BackendFn) -> BackendFn:
    """Make the backend function for ``kernel``, a call into an external library.

    Eager calls go straight to ``kernel``: a custom op costs ~100 us of Python dispatch per call, several percent
    of a FlashAttention call at diffusion shapes. Under torch.compile the call goes through the custom op
    ``attnpatch::external_attention`` instead, which dynamo does not trace into, so a pybind kernel causes no
    graph break.
    """
    _kernels[name] = kernel

    def run(*args: Unpack[SdpaArgs]) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.attnpatch.external_attention(*args[:7], name)  # all but enable_gqa (see the schema)
        return kernel(*args)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = kernel.__doc__
    return run


_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, bool is_causal, float? scale, "
    "str kernel)"
)
# The custom op's arguments, as _SCHEMA names them: the calling convention's first seven and the kernel's name.
ExternalArgs: TypeAlias = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float, bool, float | None, str
]


@torch.library.custom_op("attnpatch::external_attention", mutates_args=(), schema=_SCHEMA + " -> Tensor")
def _external_attention(*args: Unpack[ExternalArgs]) -> torch.Tensor:
    # Contiguous, as the fake below promises (the kernels return contiguous outputs already: no copy for them).
    return _run_kernel(*args).contiguous()


def _run_kernel(*args: Unpack[ExternalArgs]) -> torch.Tensor:
    # GQA is decided from the shapes (heads_kv divides heads_q), so enable_gqa is not part of the op's schema.
    query, key, value, attn_mask, dropout_p, is_causal, scale, kernel = args
    return _kernels[kernel](query, key, value, attn_mask, dropout_p, is_causal, scale, False)


@_external_attention.register_fake
def _external_attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *rest: Any) -> torch.Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@torch.library.custom_op(
    "attnpatch::external_attention_backward",
    mutates_args=(),
    schema="(Tensor grad, " + _SCHEMA[1:] + " -> (Tensor, Tensor, Tensor)",
)
def _external_attention_backward(
    grad: torch.Tensor, *args: Unpack[ExternalArgs]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Replay the forward through the library's own autograd and differentiate it: the only backward every
    # library documents (their low-level backward functions change signature between minor versions).
    with _autograd_enabled(), torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in args[:3])
        out = _run_kernel(q, k, v, *args[3:])
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return dq, dk, dv


@_external_attention_backward.register_fake
def _external_attention_backward_fake(
    grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *rest: Any
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
