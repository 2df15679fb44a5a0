"""Tiny transformers models of the families with soft-capping, sliding windows and attention sinks, built from
config (no download, CPU, a few ms a forward), and the helpers their tests share (attnpatch's own tests,
scripts/compat_table.py, users' tests of a backend that serves these arguments).

Each builder seeds torch, so two builds give the same weights, and raises ImportError naming what the installed
transformers lacks (Gemma 3 came in 4.50, gpt-oss in 4.55).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import transformers

from attnpatch.testing import transformers_models

VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2])

# 2 layers (one sliding, one full where the family alternates), 4 query heads over 2 key/value heads, head_dim 16,
# a window of 4 tokens: shorter than the prompts below, so the window cuts.
DECODER: dict[str, Any] = dict(transformers_models.DECODER, head_dim=16)
WINDOW = 4
LAYERS = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


# Gemma 3 and gpt-oss alternate: layer 0 sliding (window 4), layer 1 full.
ALTERNATING: dict[str, Any] = {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}


def _build(config: str, model: str, since: str, attn_implementation: str, **settings: Any) -> torch.nn.Module:
    # transformers.<model>(transformers.<config>(**DECODER, **settings)), seeded, in eval mode.
    try:
        config_cls, model_cls = getattr(transformers, config), getattr(transformers, model)
    except AttributeError as exc:
        raise ImportError(f"transformers {transformers.__version__} has no {model} (added in {since})") from exc
    torch.manual_seed(0)
    built: Any = model_cls(config_cls(**DECODER, **settings, attn_implementation=attn_implementation)).eval()
    if hasattr(built.model, "layers") and hasattr(built.model.layers[0].self_attn, "sinks"):
        with torch.no_grad():  # gpt-oss allocates its sinks with torch.empty: give them values that matter
            for layer in built.model.layers:
                layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, layer.self_attn.sinks.numel()))
    return built


def gemma2(attn_implementation: str = "eager") -> torch.nn.Module:
    """Gemma 2: attention logits soft-capped at 10, layer 0 sliding (window 4), layer 1 full. Its query and key
    projections are scaled up 8x: tiny random weights give logits so small that capping them changes nothing."""
    model: Any = _build(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        "4.42",
        attn_implementation,
        attn_logit_softcapping=10.0,
        final_logit_softcapping=None,
        sliding_window=WINDOW,
        query_pre_attn_scalar=16,
    )
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def gemma3(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Gemma 3 text: layer 0 sliding (window 4), layer 1 full."""
    settings = dict(ALTERNATING, query_pre_attn_scalar=16)
    return _build("Gemma3TextConfig", "Gemma3ForCausalLM", "4.50", attn_implementation, **settings)


def gpt_oss(attn_implementation: str = "eager") -> torch.nn.Module:
    """gpt-oss: attention sinks (s_aux), layer 0 sliding (window 4), layer 1 full, 4 experts."""
    experts = {"num_local_experts": 4, "num_experts_per_tok": 2}
    return _build("GptOssConfig", "GptOssForCausalLM", "4.55", attn_implementation, **ALTERNATING, **experts)


def mistral(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Mistral with a window of 4 on every layer."""
    return _build("MistralConfig", "MistralForCausalLM", "4.34", attn_implementation, sliding_window=WINDOW)


def qwen2(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Qwen2 with sliding windows of 4 from layer 1 on (max_window_layers=1)."""
    window = {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}
    return _build("Qwen2Config", "Qwen2ForCausalLM", "4.37", attn_implementation, **window)


def llama(attn_implementation: str = "sdpa") -> torch.nn.Module:
    return _build("LlamaConfig", "LlamaForCausalLM", "4.28", attn_implementation)


FAMILIES: dict[str, Callable[..., torch.nn.Module]] = {
    "gemma2": gemma2,
    "gemma3": gemma3,
    "gpt_oss": gpt_oss,
    "mistral": mistral,
    "qwen2": qwen2,
}


def left_padded() -> dict[str, torch.Tensor]:
    """Two prompts of 9 tokens, the first left-padded by 3 (longer than the window)."""
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 7, 8, 9, 10, 11]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def build_or_skip(build: Callable[..., torch.nn.Module], *args: Any) -> torch.nn.Module:
    import pytest

    try:
        return build(*args)
    except ImportError as exc:
        pytest.skip(str(exc))
    except ValueError as exc:  # "X does not support an attention implementation through ..."
        pytest.skip(f"transformers {transformers.__version__}: {exc}".split("\n")[0])


@contextmanager
def implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` as if loaded with ``attn_implementation=name``, without the load-time check of that
    implementation's package (flash-attn cannot be installed on this CPU machine): transformers reads the name
    from the config at every call, to pick both the mask function and the attention function."""
    config: Any = model.config
    saved = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = saved
