"""The router: one attention call in, the selected backend's output out.

:func:`dispatch_attention` is the public entry; :func:`route` is the same for adapters (patchers), which pass a
per-module selection and a site. A call the first backend of the chain (see :mod:`attnpatch.core.selection`)
cannot serve goes to the next one that can, with one warning per (backend, reason) and a count kept for the
report; a chain always ends in ``native`` unless strict mode is on, in which case the first backend must serve
the call or an :class:`~attnpatch.errors.UnsupportedCall` lists every candidate and its reasons.

Two paths. The fast path (no mask, no per-call backend, no checks, no observers, a first backend that serves
every call) is kept inline in :func:`dispatch_attention`: each Python call level costs ~0.1 us. Everything else
builds a :class:`~attnpatch.core.call.CallSpec`, asks each candidate for reasons (cached per call kind), and
tells the observers of :mod:`attnpatch.core.hooks`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import torch

from attnpatch.core import accounting, decide, hooks, masks, registry, selection

# Re-exported: the report, the patchers and users' tests read the counts from the router.
from attnpatch.core.accounting import (  # noqa: F401
    FallbackKey,
    fallback_counts,
    note_passthrough,
    passthrough_counts,
    reset_fallbacks,
)
from attnpatch.core.call import MASK_NONE, CallSpec, ExtraArgs, check_extras, extras_signature
from attnpatch.core.checks import check_output, run_checks
from attnpatch.core.decide import auto_candidates  # noqa: F401 (public: tools and tests rank with it)
from attnpatch.core.registry import Backend
from attnpatch.core.selection import AUTO, Chain
from attnpatch.errors import UnsupportedCall

if TYPE_CHECKING:
    from typing_extensions import Unpack

# Mirrors of the selection settings and hooks, refreshed by _sync on every change: the fast path reads plain
# module globals (a function call or another module's attribute costs measurable time per attention call).
_scope = selection.scope
_default: Chain | None = None  # None until the settings are loaded (the first call loads them)
_plain = True  # no checks and no observers: decisions may be cached
_fast = True  # _plain and no per-site override: a chain's first backend may be called with no per-call check
_contexts = 0  # attention_backend blocks open in eager code; none: only the thread-local (compiled blocks) is read
# The default chain's fast backend function while _fast and no block is open in eager code, else None: a plain call
# with no module or compiled-block selection calls it after two reads of the thread-local scope.
_default_fn: Any = None
_strict = False

# A decision: the backend serving a kind of call and the Tally counting its fallbacks (None: nothing fell back).
Decision = tuple[Backend, accounting.Tally | None]
# (chain, site, shapes, dtype, device, mask kind, causal, dropout, scale given, grad) -> decision
_decisions: dict[tuple[Any, ...], Decision] = {}
# (chain, device) -> the decision for every plain call there (decide.lead), or None where it depends on the call:
# plain calls of such chains skip the decision key (shapes, dtype, grad).
_leads: dict[tuple[Chain, torch.device], Decision | None] = {}
# A bound on what grows with the number of distinct call shapes (a decode loop, a dynamic-resolution pipeline).
MAX_DECISIONS = 1024
# Selections passed per call (``backend="auto"``), resolved once: the dispatcher's own copy, dropped on any change.
_resolved: dict[str | Chain, Chain] = {}
MAX_RESOLVED = 256
# Bound once: each module attribute read costs ~40 ns per call. torch.compile recognises the function itself.
_is_compiling = torch.compiler.is_compiling
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
_grad_enabled = torch.is_grad_enabled
_NO_EXTRA: dict[str, Any] = {}  # a call without later arguments (never written to)


def _sync() -> None:
    global _default, _plain, _fast, _strict
    # Reading a setting loads them all (from the environment where not set explicitly).
    _strict = selection.strict()
    _plain = not selection.checks() and not hooks.observers
    _fast = _plain and not hooks.has_site_overrides()
    _forget_decisions()  # strict mode, checks, the auto chooser: decisions may differ now
    _resolved.clear()
    _default = selection.loaded_default()
    _contexts_changed()


def _contexts_changed() -> None:
    # A block opened or closed: which chain a call gets changes, what each chain decides does not.
    global _contexts, _default_fn
    _contexts = selection.open_contexts()
    lead = _default.fast if _default is not None and _fast and not _contexts else None
    _default_fn = lead.fn if lead is not None else None


def _registry_changed() -> None:
    decide.forget()
    _forget_decisions()
    _resolved.clear()


def _forget_decisions() -> None:
    # Their tallies' calls join the fallback counts first.
    accounting.release([d[1] for d in _decisions.values()] + [d[1] for d in _leads.values() if d is not None])
    _decisions.clear()
    _leads.clear()


registry.on_change(_registry_changed)
selection.on_change(_sync, contexts=_contexts_changed)
hooks.on_change(_sync)


def dispatch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
    **extra: Unpack[ExtraArgs],
) -> Any:
    """Scaled dot-product attention on the selected backend.

    query: (batch, seq_q, heads, head_dim); key: (batch, seq_kv, heads_kv, head_dim);
    value: (batch, seq_kv, heads_kv, head_dim_v) -> out: (batch, seq_q, heads, head_dim_v).
    heads_kv may divide heads (GQA/MQA) with or without ``enable_gqa``.
    attn_mask: bool/integer (True = attend) or additive float; (batch|1, seq_kv) key padding,
        (batch|1, seq_q|1, seq_kv) or (batch|1, 1|heads, seq_q|1, seq_kv). Query rows with no key to attend give 0.
    is_causal: top-left aligned like torch's SDPA; may be combined with attn_mask (both apply).
    backend: per-call selection (name, alias, ``auto`` or chain), overriding every other setting.

    Keyword-only, served by the backends that declare them (the others refuse the call and it falls back):
    softcap: float > 0 (Gemma 2, flash-attn): the logits s = scale * q.k become softcap * tanh(s / softcap) before
        the mask and the softmax.
    window: (left, right) ints, -1 = unbounded on that side: query i attends key j iff i - left <= j <= i + right,
        top-left aligned like is_causal (query i sits at key position i whatever seq_q and seq_kv are; flash-attn
        aligns bottom-right, so it serves a window only when seq_q == seq_kv). Combines with is_causal and masks.
    sinks: (heads,) logits, one per query head (gpt-oss ``s_aux``), that join the softmax denominator only:
        out = out_plain * sigmoid(lse - sink).
    return_lse: True returns ``(out, lse)``, lse (batch, seq_q, heads) float32, the natural-log log-sum-exp of the
        scaled, capped, masked logits (the sink not included: the log of the whole denominator is
        logaddexp(lse, sink)). This is the layout diffusers' context parallelism (ring / Ulysses) takes from its
        backends' forward ops. Query rows with no key to attend: out 0, lse -inf.
    """
    # Fast path, kept inline (each Python call level costs ~0.1 us): no later arguments, no checks, no observers,
    # no per-site override. A selection whose first backend serves every call calls it here (a mask is normalised
    # first); any other (auto, a chain, a kernel with rules) goes straight to the decision cache of _route_slow.
    # The later arguments arrive in a dict (one truth test) rather than as keyword-only parameters, whose defaults
    # cost a dictionary lookup each on every call. The plainest call (no mask, no selection but the default) first.
    if attn_mask is None and backend is None and not extra:
        fn = _default_fn
        if fn is not None:
            local = _scope
            if local.module is None and local.context is None:
                return fn(query, key, value, None, dropout_p, is_causal, scale, enable_gqa)
    if not extra and _fast:
        if backend is None:
            local = _scope
            chain = local.module or (selection.context_chain() if _contexts else local.context) or _default
        else:
            chain = _resolved.get(backend) or _resolve(backend)
        if chain is not None:
            kind = MASK_NONE
            fast = chain.fast
            if attn_mask is not None:
                if fast is not None and fast.is_sdpa and not is_causal and isinstance(attn_mask, torch.Tensor):
                    # torch's SDPA (native) takes a 4-D bool mask, or an additive one in the query's dtype, as the
                    # dispatcher reads it (as in route_bhsd), and a 2-D bool key-padding mask seen before as its kept
                    # view; SDPA checks the shapes, and a mask it refuses gets the dispatcher's one-line error.
                    ndim = attn_mask.ndim
                    if ndim == 4 and (attn_mask.dtype is torch.bool or attn_mask.dtype is query.dtype):
                        as_is: torch.Tensor | None = attn_mask
                    elif ndim == 2 and not _is_dynamo_compiling():
                        kept = masks.padding  # read once: another thread may keep another mask meanwhile
                        as_is = kept[1] if attn_mask is kept[0] else None
                    else:
                        as_is = None
                    if as_is is not None:
                        try:
                            return fast.fn(query, key, value, as_is, dropout_p, is_causal, scale, enable_gqa)
                        except RuntimeError:
                            masks.explain(attn_mask, query, key)
                            raise
                attn_mask, kind = masks.normalize(attn_mask, query, key)
                if is_causal:
                    attn_mask, kind = masks.fold_causal(attn_mask, kind, query.shape[1], key.shape[1])
                    is_causal = False
            if fast is None and not _is_dynamo_compiling():
                # A chain's lead on this device (see _route_slow), when it is a built-in that serves every call: like
                # chain.fast, called with no fallback (none would mend its failure), its tally counting the call.
                led = _leads.get((chain, query.device))
                if led is not None and led[0].builtin:
                    fast = led[0]
                    if led[1] is not None:
                        led[1].calls += 1
            if fast is not None:
                return fast.fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            return _route_slow(
                chain, query, key, value, attn_mask, kind, dropout_p, is_causal, scale, enable_gqa, None, _NO_EXTRA
            )
    if extra:  # a separate call: route(..., **extra) makes route parse a dict of keywords, ~0.3 us, even if empty
        return route(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa, backend=backend, **extra)  # fmt: skip
    return route(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                 enable_gqa=enable_gqa, backend=backend)  # fmt: skip


def route(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    backend: str | Chain | None = None,
    module_chain: Chain | None = None,
    site: str | None = None,
    **extra: Unpack[ExtraArgs],
) -> Any:
    """:func:`dispatch_attention` for adapters, tensors (batch, seq, heads, head_dim).

    ``module_chain`` is the per-module selection, if any; ``site`` names the calling module for the report
    (default: the site set by :func:`attnpatch.core.selection.push_module`). ``softcap``, ``window``, ``sinks`` and
    ``return_lse`` as in :func:`dispatch_attention` (keyword-only); ``return_lse=True`` returns ``(out, lse)``.
    """
    chain = effective_chain(backend, module_chain)
    if (not _plain or _default is None) and selection.checks():
        run_checks(query, key, value, attn_mask, is_causal, chain)
    kind = MASK_NONE
    if attn_mask is not None:
        attn_mask, kind = masks.normalize(attn_mask, query, key)
        if is_causal:
            attn_mask, kind = masks.fold_causal(attn_mask, kind, query.shape[1], key.shape[1])
            is_causal = False
    if extra:  # validated and normalised once (is_causal may fold into the window); {} when nothing is left
        given, is_causal = check_extras(query, key, attn_mask, is_causal, dict(extra))
        if given:
            args = (query, key, value, attn_mask, kind, dropout_p, is_causal, scale, enable_gqa, site, given)
            return _route_slow(chain, *args)
    fast = chain.fast
    if fast is not None and _fast:
        return fast.fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return _route_slow(
        chain, query, key, value, attn_mask, kind, dropout_p, is_causal, scale, enable_gqa, site, _NO_EXTRA
    )


def route_bhsd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    module_chain: Chain | None = None,
    site: str | None = None,
    **extra: Unpack[ExtraArgs],
) -> Any:
    """:func:`route` for tensors in SDPA's layout: query (batch, heads, seq_q, head_dim), key/value (batch, heads_kv,
    seq_kv, head_dim[_v]) -> out (batch, heads, seq_q, head_dim_v) (with ``return_lse``: ``(out, lse)``, lse
    (batch, seq_q, heads) as :func:`dispatch_attention` returns it).

    On the fast path a backend that takes this layout (``Backend.fn_bhsd``: ``native``) gets the tensors as they
    are (:func:`route` would cost two transposes each way); every other call is :func:`route` on transposed views.
    For ``native`` a 4-D bool mask, or an additive one in the query's dtype, is also passed as it is: SDPA reads
    it as the dispatcher does and checks its shape itself (other masks are normalised as in :func:`route`).
    """
    if not extra and _fast:
        fast = (module_chain or effective_chain()).fast  # (a module's selection wins: no call for it)
        if fast is not None and fast.fn_bhsd is not None:
            if attn_mask is not None and not (
                # A 4-D bool mask, or an additive one in the query's dtype, means the same to torch's SDPA as to the
                # dispatcher: SDPA itself takes it as it is and checks its shape (the patchers hand over masks
                # that their library made for SDPA). Anything else is normalised: 2-D key padding, integer masks,
                # a mask with is_causal (folded; SDPA refuses both).
                fast.is_sdpa
                and not is_causal
                and attn_mask.dim() == 4
                and (attn_mask.dtype is torch.bool or attn_mask.dtype is query.dtype)
            ):
                attn_mask, kind = masks.normalize(attn_mask, query, key, bhsd=True)
                if is_causal:
                    attn_mask, kind = masks.fold_causal(attn_mask, kind, query.shape[2], key.shape[2])
                    is_causal = False
            return fast.fn_bhsd(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    # The same keywords passed on, as dispatch_attention does (one line each would repeat its list again).
    out = route(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask,
                dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                module_chain=module_chain, site=site, **extra)  # fmt: skip
    if isinstance(out, tuple):  # return_lse: (out, lse); lse keeps the dispatcher's layout
        return out[0].transpose(1, 2), out[1]
    return out.transpose(1, 2)


def runs_sdpa(module_chain: Chain | None = None) -> bool:
    """Whether a call routed here now with this per-module selection would run torch's SDPA as it is: the chain's
    first backend is ``native`` (``Backend.is_sdpa``) on the fast path (no checks, observers or per-site override).
    A patcher holding a call the caller wrote for SDPA may then let it run unchanged: the same result, no routing.
    """
    if not _fast:
        return False
    fast = (module_chain or effective_chain()).fast
    return fast is not None and fast.is_sdpa


def effective_chain(backend: str | Chain | None = None, module_chain: Chain | None = None) -> Chain:
    """The chain :func:`route` would use with these arguments, here and now (for adapters that lay a call out
    the way the library would for the backend that serves it)."""
    if backend is not None:
        return _resolved.get(backend) or _resolve(backend)
    context = selection.context_chain() if _contexts else _scope.context
    return module_chain or _scope.module or context or _default or selection.default_chain()


def _resolve(backend: str | Chain) -> Chain:
    chain = selection.resolve(backend)
    if len(_resolved) >= MAX_RESOLVED:
        _resolved.clear()
    _resolved[backend] = chain
    return chain


def _route_slow(
    chain: Chain,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    kind: str,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    site: str | None,
    extra: dict[str, Any],
) -> Any:
    # A call of a kind seen before, with nobody observing: the decision made then (which backend serves it, which
    # refused and why, for the counts), without a CallSpec, reasons or auto's ranking. Plain calls of a chain whose
    # backend depends only on the device (a fallback past backends that run elsewhere, auto where one backend ranks
    # first for everything) look up (chain, device); others a tuple of the facts the decision depends on. Anything
    # else (a registry change, device emulation, strict mode, another auto chooser) clears both caches.
    decision_key = None
    decided: Any = None
    if _plain:  # no observers, no checks (they see every call)
        # A lead is keyed by the device alone: any tracing but dynamo's (whose guards would cover the cache) may use it.
        if _fast and not extra and not _is_dynamo_compiling():
            decided = _leads.get((chain, query.device))
        if not decided and not _is_compiling():
            site = site or _scope.site
            needs_grad = _grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
            if extra and "sinks" in extra and extra["sinks"].requires_grad:  # learnable sinks need a backward too
                needs_grad = torch.is_grad_enabled()
            decision_key = (
                chain,
                site,
                query.shape,
                key.shape,
                value.shape,  # (the head dim of values decides; the whole shape is one attribute read cheaper)
                query.dtype,
                query.device,
                kind,
                is_causal,
                dropout_p > 0.0,
                scale is None,
                needs_grad,
                tuple(extra) if extra else (),  # which later arguments the call has (their values decide nothing)
            )
            decided = _decisions.get(decision_key)
        if decided:
            decided_backend, counted = decided
            try:
                # Not fn(..., **extra): a star call costs ~50 ns, also when extra is empty.
                run: Any = functools.partial(decided_backend.extra_fn, **extra) if extra else decided_backend.fn
                out = run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            except Exception:
                pass
            else:
                if counted is not None:
                    counted.calls += 1
                return out
    site = site or _scope.site
    call = CallSpec.of(query, key, value, kind, dropout_p, is_causal, scale, **extra)
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    requested = chain
    override = hooks.site_override(site)
    if override is not None:
        chain = selection.resolve(override)
    refused: dict[str, list[str]] = {}
    observers = hooks.observers
    timer = hooks.call_timer() if observers and not call.compiling else None
    failure: Exception | None = None
    for member in decide.candidates(chain, _strict):
        backend = decide.pick_auto(call, args, extra) if member == AUTO else member
        if isinstance(backend, str):  # auto found nothing; its reasons are already recorded below
            refused[AUTO] = ["no registered backend can serve this call"]
            continue
        reasons = decide.reasons(backend, call)
        if reasons:
            refused[backend.name] = reasons
            failure = None
            if _strict:
                break
            continue
        fn: Any = functools.partial(backend.extra_fn, **extra) if extra else backend.fn
        if call.compiling:  # no try under tracing: an error there is a compile error, not a kernel failure
            return _observed(fn(*args), None, backend, requested, refused, site, args, call, extra)
        try:
            out, seconds = timer(fn, args) if timer is not None else (fn(*args), None)
        except Exception as exc:  # a kernel that raises falls back like one that refused (strict mode: raises)
            if _strict:
                _name_backend(exc, backend.name)
                raise
            failure = exc
            refused[backend.name] = [f"raised {type(exc).__name__}: {_shorten(str(exc))}"]
            continue
        counted = accounting.note_fallback(chain.spec, backend.name, refused) if refused else ()
        if selection.checks():
            check_output(out[0] if call.return_lse else out, query, value, backend.name)
        if decision_key is not None:  # (an override is part of it: the site is in the key, a change clears all)
            if len(_decisions) >= MAX_DECISIONS:
                _forget_decisions()
            decision = (backend, accounting.tally(counted))
            _decisions[decision_key] = decision
            if _fast and not extra and (chain, query.device) not in _leads:
                _leads[(chain, query.device)] = _lead(chain, call, decision, refused)
        return _observed(out, seconds, backend, requested, refused, site, args, call, extra)
    if failure is not None:
        raise failure  # the last candidate raised too (native on bad input, say): its own error, as unpatched
    message = decide.unsupported_message(chain, call, refused, _strict)
    raise UnsupportedCall(message, decide.all_reasons(chain, call, refused)) from failure


def _lead(chain: Chain, call: CallSpec, decision: Decision, refused: dict[str, list[str]]) -> Decision | None:
    # Kept only as this call confirmed it (the same backend served, after the same refusals): it shares the
    # decision's tally, so every later call counts the same fallbacks as this one.
    found = decide.lead(chain, call, _strict)
    if found is None or found[0] is not decision[0] or found[1] != refused:
        return None
    return decision


def _observed(
    out: Any,
    seconds: float | None,
    backend: Backend,
    requested: Chain,
    refused: dict[str, list[str]],
    site: str | None,
    args: tuple[Any, ...],
    call: CallSpec,
    extra: dict[str, Any],
) -> Any:
    # Tell the observers (report, verify); one may hand back a replacement output (verify's fallback action).
    # With return_lse they see the output tensor; the lse goes back to the caller beside it.
    if not hooks.observers or call.compiling:
        return out
    if call.return_lse:
        output, lse = out
        plain = dataclasses.replace(call, return_lse=False)
        return _observed(output, seconds, backend, requested, refused, site, args, plain, extra), lse
    query, key, value, attn_mask, dropout_p, is_causal, scale, _ = args
    record = hooks.CallRecord(
        site, requested.spec, backend.name, refused, query, key, value, attn_mask, dropout_p, is_causal, scale, out
    )
    record.seconds, record.extra = seconds, {name: got for name, got in extra.items() if name != "return_lse"}
    for observer in list(hooks.observers):  # a replacement of a call with later arguments is not taken: one made
        replaced = observer(record)  # without them would drop them silently
        if replaced is not None and not (call.softcap or call.window or call.sinks):
            out = record.output = replaced
    return out


def _name_backend(exc: Exception, name: str) -> None:
    # Strict mode re-raises the kernel's own exception (its type is what callers catch); the note names the backend.
    if hasattr(exc, "add_note"):
        exc.add_note(f"attnpatch: raised by backend {name!r} (strict mode: no fallback)")


def _shorten(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# help() and inspect show the later arguments by name (they arrive in **extra: see dispatch_attention).
dispatch_attention.__signature__ = extras_signature(dispatch_attention)  # type: ignore[attr-defined]
route.__signature__ = extras_signature(route)  # type: ignore[attr-defined]

# Load the settings (ATTNPATCH_* where not set explicitly) and the built-in backends now, when routing is first
# needed: loading them lazily on the first call could happen inside a torch.compile trace, where the lock and the
# environment read are graph breaks and the globals set afterwards force recompiles.
_sync()
