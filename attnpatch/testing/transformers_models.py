"""Tiny transformers models for tests, built from config: no download, CPU, fast.

Each builder seeds torch (``seed``) so two builds give the same weights, and works on every transformers version
the patcher supports, or raises ImportError naming what the installed version lacks. Offline tokenizers and the
pipelines that use these models are in :mod:`attnpatch.testing.tiny`.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2])


# Shared decoder sizes: 2 layers, 4 query heads over 2 key/value heads (GQA), head_dim 16.
def _encoder(width: int) -> dict[str, Any]:
    # 2 layers of 4 heads, hidden size ``width``, MLP twice as wide.
    return dict(
        vocab_size=128, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4
    )


DECODER: dict[str, Any] = dict(_encoder(64), num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _build(model_cls: type, config_cls: Any, seed: int = 0, **config: Any) -> torch.nn.Module:
    # config_cls is typed Any: transformers 5's typed configs do not declare the keywords every config takes
    # (attn_implementation) in their signatures.
    torch.manual_seed(seed)
    model: torch.nn.Module = model_cls(config_cls(**config)).eval()
    return model


def left_padded_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of two prompts, the first left-padded by 2: (input_ids (2, 6), attention_mask (2, 6))."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8]])
    return ids, (ids != 0).long()


def llama(attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """Llama: 2 layers, 4 query heads over 2 key/value heads (GQA), head_dim 16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build(
        LlamaForCausalLM,
        LlamaConfig,
        seed,
        **DECODER,
        max_position_embeddings=128,
        attn_implementation=attn_implementation,
    )


def bert(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """BERT: bidirectional, padding mask. Its 4.5x SDPA layer calls F.sdpa from a decorated forward."""
    from transformers import BertConfig, BertModel

    return _build(BertModel, BertConfig, **_encoder(64), attn_implementation=attn_implementation)


def gemma2(softcap: float | None = 50.0, attn_implementation: str = "eager") -> torch.nn.Module:
    """Gemma2 (soft-capped attention logits by default). transformers 5 runs it eager only."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _build(
        Gemma2ForCausalLM,
        Gemma2Config,
        **DECODER,
        head_dim=16,
        attn_logit_softcapping=softcap,
        final_logit_softcapping=None,
        sliding_window=4,
        attn_implementation=attn_implementation,
    )


def clip_text(attn_implementation: str = "sdpa", width: int = 64, seed: int = 0) -> torch.nn.Module:
    """CLIP text encoder: 2 layers, 4 heads, hidden size ``width``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return _build(
        CLIPTextModel,
        CLIPTextConfig,
        seed,
        **_encoder(width),
        max_position_embeddings=32,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        attn_implementation=attn_implementation,
    )


def t5_encoder(attn_implementation: str | None = None, width: int = 64, seed: int = 0) -> torch.nn.Module:
    """T5 encoder (2 layers, 4 heads, d_model ``width``); attn_implementation None = sdpa where the version has
    it for T5 (5.15+), else eager."""
    from transformers import T5Config, T5EncoderModel

    implementation = attn_implementation or _sdpa_or_eager(T5EncoderModel)
    sizes = dict(_T5, d_model=width, d_kv=width // 4, d_ff=2 * width)
    return _build(T5EncoderModel, T5Config, seed, **sizes, attn_implementation=implementation)


def umt5_encoder(attn_implementation: str | None = None) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    implementation = attn_implementation or _sdpa_or_eager(UMT5EncoderModel)
    return _build(UMT5EncoderModel, UMT5Config, **_T5, attn_implementation=implementation)


def t5_seq2seq(attn_implementation: str | None = None) -> torch.nn.Module:
    """T5 encoder-decoder: encoder and causal decoder self-attention with relative position bias, cross-attention."""
    from transformers import T5Config, T5ForConditionalGeneration

    implementation = attn_implementation or _sdpa_or_eager(T5ForConditionalGeneration)
    return _build(
        T5ForConditionalGeneration, T5Config, **_T5, decoder_start_token_id=0, attn_implementation=implementation
    )


def _sdpa_or_eager(model_cls: type) -> str:
    return "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"


_T5: dict[str, Any] = dict(
    vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8
)


def qwen2_5_vl() -> torch.nn.Module:
    """Qwen2.5-VL with a 2-block vision tower (one windowed block, one full) and a 2-layer text model."""
    try:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    except ImportError as exc:
        raise ImportError(f"transformers {transformers.__version__} has no Qwen2.5-VL (added in 4.49)") from exc
    text = dict(DECODER, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    if TRANSFORMERS_VERSION >= (5, 0):
        text = dict(DECODER, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4})
    return _build(
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLConfig,
        text_config=text,
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=100,
        video_token_id=101,
        vision_start_token_id=102,
        vision_end_token_id=103,
        attn_implementation="sdpa",
    )


def qwen2_5_vl_inputs() -> dict[str, torch.Tensor]:
    """Two left-padded prompts, each with one 4x8-patch image (8 image tokens after the 2x2 merge)."""
    ids = torch.tensor([[0, 0, 5, 102] + [100] * 8 + [103, 6, 7], [3, 4, 5, 102] + [100] * 8 + [103, 6, 7]])
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "pixel_values": torch.randn(64, 3 * 2 * 14 * 14, generator=generator),
        "image_grid_thw": torch.tensor([[1, 4, 8], [1, 4, 8]]),
    }
