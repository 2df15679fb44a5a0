"""Which transformers attention calls attnpatch routes, why it leaves the others to transformers, and how a routed
call is laid out (GQA for ``native`` exactly as transformers' sdpa function lays it out).

The rules the transformers patcher applies to each call of an attention function: keyword arguments no
dispatcher backend serves, masks it does not read, attention weights asked for, and eager functions that are
more than plain softmax attention (found by reading their code). Each refusal is a reason the report shows.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch

from attnpatch.patchers._base import code_names

# Keyword arguments a call may carry that the router does not hand to the dispatcher: a call that carries one
# (not None) runs the original code. softcap and s_aux are routed where the function applies them (an eager function
# that names softcap, gpt-oss's sinks eager function, flash and flex); anything else in **kwargs the originals ignore.
PASSTHROUGH_KWARGS = {
    "softcap": "logit soft-capping (softcap) given to a function that does not apply it: left to transformers",
    "s_aux": "attention sinks (s_aux) given to a function that does not apply them: left to transformers",
    "sinks": "attention sinks (sinks=) are not a keyword transformers' functions apply: left to transformers",
    "cu_seq_lens_q": "varlen attention (cu_seq_lens_q) is served by transformers' own kernel",
    "cu_seq_lens_k": "varlen attention (cu_seq_lens_k) is served by transformers' own kernel",
    "cache": "a paged KV cache (continuous batching) is updated inside transformers' attention function",
    "head_mask": "head_mask (scaling the attention probabilities per head) is not served by attnpatch backends",
}
PASSTHROUGH_NAMES = frozenset(PASSTHROUGH_KWARGS)
WEIGHTS_REQUESTED = "attention weights requested (output_attentions=True): eager runs as loaded to return them"
POSITIONAL = "extra positional arguments to the attention function: not a call shape attnpatch knows"
NOT_A_TENSOR = "attention mask is not a tensor (block or custom mask): left to transformers"
BIAS_IGNORED = "position_bias given to an sdpa function that does not take one (transformers < 5.15)"

# Names a plain softmax-attention eager function reads (matmul, optional repeat_kv / softcap / position bias /
# head_mask, softmax, dropout). A function reading anything else (sinks, logsumexp, autocast, concatenated logits) does
# more than softmax attention, and routing it would change its result.
PLAIN_EAGER_NAMES = frozenset(
    {
        "contiguous",
        "dropout",
        "dtype",
        "float32",
        "functional",
        "getattr",
        "hasattr",
        "head_dim",
        "matmul",
        "ndim",
        "nn",
        "num_key_value_groups",
        "repeat_kv",
        "shape",
        "size",
        "softmax",
        "tanh",
        "to",
        "torch",
        "training",
        "transpose",
        "type",
        "view",
    }
)
PLAIN_EAGER_PARAMS = frozenset(
    {
        "module",
        "query",
        "key",
        "value",
        "query_states",
        "key_states",
        "value_states",
        "attention_mask",
        "scaling",
        "dropout",
        "softcap",
        "position_bias",
        "sliding_window",
        "head_mask",
        "output_attentions",
        "kwargs",
    }
)


def refusal(
    attention_mask: Any, args: tuple[Any, ...], kwargs: dict[str, Any], served: frozenset[str] = frozenset()
) -> str | None:
    """Why this call must run the original function, or None when the dispatcher can serve it.

    served: the keywords of PASSTHROUGH_KWARGS this function applies and the router hands to the dispatcher."""
    if args:
        return POSITIONAL
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            return NOT_A_TENSOR
        if attention_mask.dim() != 4:
            # transformers' masks are (B|1, H|1, Sq, Skv); the dispatcher would read 2-D as key padding, SDPA as
            # (Sq, Skv): rather than guess, let the original function read it.
            return f"a {attention_mask.dim()}-D attention mask (transformers passes 4-D ones): left to transformers"
    if PASSTHROUGH_NAMES.isdisjoint(kwargs):  # the common call: none of those keywords at all
        return None
    for name, reason in PASSTHROUGH_KWARGS.items():
        if name not in served and kwargs.get(name) is not None:
            return reason
    return None


def weights_requested(module: Any, kwargs: dict[str, Any]) -> bool:
    """Whether this call's attention weights were asked for, in any of the ways transformers asks."""
    # transformers resolves output_attentions the same way: the call argument wins, else the config says.
    if "output_attentions" in kwargs:
        return bool(kwargs["output_attentions"])
    if getattr(getattr(module, "config", None), "output_attentions", False):
        return True
    # transformers 5.x models decorated with @capture_outputs (GPT-2, Llama, ...) collect the weights by hooking
    # their attention modules' outputs while a collector is active: output_attentions=True on the model's forward
    # reaches neither the attention function nor the config. An active collector that wants attentions is a request.
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    if collector is not None:
        wanted = collector.get()
        if wanted and ("attentions" in wanted or "cross_attentions" in wanted):
            return True
    return False


def plain_eager_refusal(fn: Callable[..., Any]) -> str | None:
    """Why the eager function ``fn`` is not plain softmax attention (None when it is)."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    if code is None:
        return f"eager attention function {describe(fn)} is not Python code attnpatch can inspect"
    extra = sorted(set(code_names(code)) - PLAIN_EAGER_NAMES)
    unknown_params = sorted(set(parameters(fn)) - PLAIN_EAGER_PARAMS)
    if extra or unknown_params:
        what = ", ".join(extra + unknown_params)
        return f"eager attention function {describe(fn)} does more than softmax attention (uses {what})"
    return None


# gpt-oss's eager function: plain attention whose softmax also runs over one sink logit per head (module.sinks),
# shifted by the row maximum (no change to the result), the sink's column dropped after the softmax.
SINKS_EAGER_NAMES = PLAIN_EAGER_NAMES | {"F", "cat", "expand", "max", "reshape", "sinks", "values"}


def sinks_eager(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is an eager function of gpt-oss's kind: softmax attention with ``module.sinks``."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    if code is None:
        return False
    names = set(code_names(code))
    return "sinks" in names and names <= SINKS_EAGER_NAMES and set(parameters(fn)) <= PLAIN_EAGER_PARAMS


def layer_sinks(module: Any, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The sink logits (heads_q,) a gpt-oss eager call reads from its layer, when the call passes the same tensor
    as ``s_aux`` (as gpt-oss's attention does); None otherwise: then what the function reads is not known."""
    sinks = kwargs.get("s_aux")
    if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1:
        return None
    return sinks if sinks is getattr(module, "sinks", None) else None


def parameters(fn: Callable[..., Any]) -> tuple[str, ...]:
    code = inspect.unwrap(fn).__code__
    return code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


def describe(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def gqa_as_transformers(
    chain: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    query_shape: torch.Size,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """For ``native``: lay a GQA call out exactly as this transformers' sdpa function does, so the output is
    bitwise the unpatched one (query (B, H, Sq, D), key/value (B, Hkv, Skv, D)). Its choice: ``enable_gqa`` (no mask,
    head dims <= 256), for one query token the query heads packed onto the key/value heads, else ``repeat_kv``.
    Other backends get the un-repeated heads (their kernels do GQA themselves); returns (..., packed).
    ``chain``: the selection the call is routed with (:func:`attnpatch.core.dispatch.effective_chain`);
    ``query_shape``: ``query.shape``, read once by the caller (each read builds a torch.Size)."""
    fast = chain.fast
    if fast is None or fast.name != "native" or not fast.builtin:  # (attributes: no registry state to guard on)
        return query, key, value, mask, 0
    use_gqa, takes_value, pack, repeat = _sdpa_helpers(sys.modules.get("transformers.integrations.sdpa_attention"))
    key_shape = key.shape
    n_rep = query_shape[1] // key_shape[1]
    traced = torch.compiler.is_dynamo_compiling()  # (transformers packs only outside dynamo: is_torchdynamo_compiling)
    if use_gqa is not None and _uses_gqa(use_gqa, takes_value, mask, key, value, key_shape, traced):
        return query, key, value, mask, 0
    if pack is not None and query_shape[2] == 1 and not traced:
        return pack(query, n_rep), key, value, pack(mask, n_rep), 1
    if repeat is None:
        return query, key, value, mask, 0
    return query, repeat(key, n_rep), repeat(value, n_rep), mask, 0


# (use_gqa_in_sdpa, mask is None, key head dim, value head dim) -> its answer.
_gqa_answers: dict[tuple[Any, bool, int, int], bool] = {}


def _uses_gqa(
    use_gqa: Any,
    takes_value: bool,
    mask: Any,
    key: torch.Tensor,
    value: torch.Tensor,
    key_shape: torch.Size,
    traced: bool,
) -> bool:
    # transformers' use_gqa_in_sdpa reads os.environ on every call (a missing variable raises and catches a KeyError
    # inside os.environ.get: several microseconds a call inside a model). Outside tracing its answer depends only on
    # whether there is a mask, the head dims and the process (torch version, device kind, TRANSFORMERS_SDPA_FORCE_GQA,
    # read here at the first call of each kind), so it is asked once per kind. Either answer computes the same
    # attention; it decides only the layout, which keeps native bitwise equal to the unpatched call.
    kind = None if traced or type(key) is not torch.Tensor else (use_gqa, mask is None, key_shape[-1], value.shape[-1])
    answer = _gqa_answers.get(kind) if kind is not None else None
    if answer is None:
        answer = bool(use_gqa(mask, key, value) if takes_value else use_gqa(mask, key))
        if kind is not None:
            if len(_gqa_answers) >= 64:
                _gqa_answers.clear()
            _gqa_answers[kind] = answer
    return answer


@functools.cache
def _sdpa_helpers(functions: Any) -> tuple[Any, bool, Any, Any]:
    # transformers' sdpa module (None before it is imported): use_gqa_in_sdpa and whether it takes the value (5+),
    # pack_gqa (recent 5.x) and repeat_kv, looked up once per module object instead of on every call.
    use_gqa = getattr(functions, "use_gqa_in_sdpa", None)
    # use_gqa_in_sdpa(attention_mask, key) before transformers 5, (attention_mask, key, value) since.
    takes_value = use_gqa is not None and len(parameters(use_gqa)) >= 3
    return use_gqa, takes_value, getattr(functions, "pack_gqa", None), getattr(functions, "repeat_kv", None)
