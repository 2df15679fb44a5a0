"""Tiny diffusers and transformers models built from config, with offline tokenizers: no download, no weights.

They are the real classes (``StableDiffusionPipeline``, ``FluxPipeline``, ``LlamaForCausalLM``) with random
weights and a few dozen channels, so every attention path a full-size model takes runs here in milliseconds on
a CPU. The demo, the end-to-end benchmark, the tests and ``examples/tiny_offline.py`` use them::

    from attnpatch import tiny
    pipe = tiny.stable_diffusion_pipeline()          # 32x32 images
    image = pipe("a red cube", num_inference_steps=2, generator=tiny.generator()).images[0]
    model, tokenizer = tiny.llama()                   # GQA: 4 query heads, 2 key/value heads

Weights depend only on ``seed``, so two builds with one seed are identical. Needs diffusers and transformers
(``pip install 'attnpatch[diffusers,transformers]'``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import string
import warnings
from collections.abc import Iterator
from typing import Any

import torch

# Characters the offline tokenizers know; anything else becomes the unknown token. Small enough that every
# token id fits the tiny models' 128-entry embedding tables.
_CHARS = string.ascii_lowercase + string.digits + " .,!?'-"
VOCAB_SIZE = 128


def missing() -> list[str]:
    """Why the tiny models cannot be built here (empty when they can). Imports neither library."""
    reasons = []
    for module, extra in (("diffusers", "diffusers"), ("transformers", "transformers")):
        if importlib.util.find_spec(module) is None:
            reasons.append(f"{module} not installed: pip install 'attnpatch[{extra}]'")
    if not reasons:
        # The offline tokenizers are built from in-memory vocabularies, which transformers 5 takes (4.x wants files).
        version = importlib.metadata.version("transformers")
        if int(version.split(".")[0]) < 5:
            reasons.append(
                f"transformers {version} is too old for the offline tokenizers: pip install -U 'transformers>=5'"
            )
    return reasons


def generator(seed: int = 0) -> torch.Generator:
    """A CPU generator for pipeline calls, so two runs draw the same latents."""
    return torch.Generator("cpu").manual_seed(seed)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # diffusers/transformers log advice about missing optional packages (torchvision, safety checker) that
    # means nothing for a model built from config; keep the demo's output to what it measured.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torchvision.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        diffusers_logging.set_verbosity(saved[0])
        transformers_logging.set_verbosity(saved[1])


def place(obj: Any, device: Any = "cpu", dtype: torch.dtype | None = None) -> Any:
    """``obj.to(device, dtype)`` for a pipeline or model, without diffusers' advice about from_pretrained."""
    if torch.device(device).type == "cpu" and dtype in (None, torch.float32):
        return obj
    with _quiet():
        return obj.to(device, dtype) if dtype is not None else obj.to(device)


def clip_tokenizer(max_length: int = 16) -> Any:
    """A CLIPTokenizer over single characters (byte-level BPE with no merges), built offline."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS.replace(" ", ""):
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 16) -> Any:
    """A T5Tokenizer (unigram) over single characters, built offline."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(ch, -3.0) for ch in _CHARS if ch != " "]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def llama_tokenizer() -> Any:
    """A LlamaTokenizer (byte-fallback-free BPE over single characters) that pads on the left, built offline."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for ch in _CHARS.replace(" ", ""):
        vocab[ch] = len(vocab)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], padding_side="left")
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def clip_text_model(seed: int = 0) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def t5_encoder(seed: int = 0) -> Any:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
    )
    return T5EncoderModel(config).eval()


def vae(seed: int = 0, **config: Any) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model: Any = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
        **config,
    )
    return model.eval()


def unet(seed: int = 0) -> Any:
    """UNet2DConditionModel: cross-attention at 16x16 (down and up) and in the 8x8 mid block.

    2 heads (diffusers' legacy ``attention_head_dim`` is the head count here), so head dims are 16 and 32: multiples
    of 8, which fused GPU kernels (flash, cuDNN, sage) need, so the demo exercises them on a GPU.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model: Any = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
    )
    return model.eval()


def flux_transformer(seed: int = 0) -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model: Any = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )
    return model.eval()


def stable_diffusion_pipeline(seed: int = 0) -> Any:
    """StableDiffusionPipeline (UNet, VAE, CLIP text encoder, DDIM): 32x32 images, ~20 ms for 2 steps on a CPU."""
    with _quiet():
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe: Any = StableDiffusionPipeline(
            vae=vae(seed),
            text_encoder=clip_text_model(seed),
            tokenizer=clip_tokenizer(),
            unet=unet(seed),
            scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline(seed: int = 0) -> Any:
    """FluxPipeline (Flux transformer, VAE, CLIP and T5 text encoders): 32x32 images, 2 steps in ~30 ms on a CPU."""
    with _quiet():
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        pipe: Any = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            # Flux un-normalises latents with a shift as well as a scale.
            vae=vae(seed, shift_factor=0.0609, scaling_factor=1.5035),
            text_encoder=clip_text_model(seed),
            tokenizer=clip_tokenizer(),
            text_encoder_2=t5_encoder(seed),
            tokenizer_2=t5_tokenizer(),
            transformer=flux_transformer(seed),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def llama(seed: int = 0) -> tuple[Any, Any]:
    """(LlamaForCausalLM, tokenizer): 2 layers, 4 query heads over 2 key/value heads (GQA), left padding."""
    with _quiet():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        tokenizer = llama_tokenizer()
        config = LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = LlamaForCausalLM(config).eval()
    return model, tokenizer
