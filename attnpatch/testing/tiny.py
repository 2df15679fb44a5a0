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
import json
import os
import string
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from attnpatch.testing import diffusers_models  # imports neither library until a model is built

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
    if _transformers_major() >= 5:
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    directory = tempfile.mkdtemp(prefix="attnpatch-clip-tokenizer-")  # transformers 4 reads files only
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(
        os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"), model_max_length=max_length
    )


def t5_tokenizer(max_length: int = 16) -> Any:
    """A T5 tokenizer (unigram) over single characters, built offline."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(ch, -3.0) for ch in _CHARS if ch != " "]
    if _transformers_major() >= 5:
        from transformers import T5Tokenizer

        return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
    # transformers 4 builds the slow tokenizer from a sentencepiece file only: the fast one from a unigram model.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]  # transformers 4 only

    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=max_length
    )


def _transformers_major() -> int:
    return int(importlib.metadata.version("transformers").split(".")[0])


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
    """CLIPTextModel: 2 layers, 4 heads, hidden size 32."""
    from attnpatch.testing import transformers_models

    return transformers_models.clip_text(width=32, seed=seed)


def t5_encoder(seed: int = 0) -> Any:
    """T5EncoderModel: 2 layers, 4 heads of 8, d_model 32."""
    from attnpatch.testing import transformers_models

    return transformers_models.t5_encoder(width=32, seed=seed)


def vae(seed: int = 0, **config: Any) -> Any:
    """AutoencoderKL: 2 blocks (32, 64 channels); its mid block has one attention layer each side."""
    return diffusers_models.build(diffusers_models.FAMILIES["vae"], seed, **config)


def unet(seed: int = 0) -> Any:
    """UNet2DConditionModel: cross-attention at 16x16 (down and up) and in the 8x8 mid block.

    2 heads (diffusers' legacy ``attention_head_dim`` is the head count here), so head dims are 16 and 32: multiples
    of 8, which fused GPU kernels (flash, cuDNN, sage) need, so the demo exercises them on a GPU.
    """
    return diffusers_models.build(diffusers_models.FAMILIES["unet"], seed, attention_head_dim=2)


def flux_transformer(seed: int = 0) -> Any:
    """FluxTransformer2DModel: one double-stream and one single-stream block, 2 heads of 16."""
    return diffusers_models.build(diffusers_models.FAMILIES["flux"], seed)


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
    from attnpatch.testing import transformers_models

    with _quiet():
        tokenizer = llama_tokenizer()
        model = transformers_models.llama(seed=seed)
    # The tokenizer's special ids are the catalogue's: unknown/padding 0, start 1, end 2.
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    return model, tokenizer
