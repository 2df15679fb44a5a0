"""Tiny diffusers models built from config (no download), with inputs, for tests and scripts/compat_table.py.

Each family builds in well under a second on a CPU and runs a forward in milliseconds. Configs follow
diffusers' own model tests; :mod:`attnpatch.testing.tiny` builds its pipelines from the same configs. A family
whose class the installed diffusers lacks is reported as missing with the reason, never as a failure of
attnpatch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


class SdpaCounter(TorchFunctionMode):
    """Counts calls of torch's own SDPA, whoever makes them: the softmax attention calls a model makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            self.calls += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Family:
    name: str
    class_name: str
    config: dict[str, Any]
    inputs: Callable[[torch.Generator], dict[str, Any]]
    # How the model's output tensor is read from what forward returns.
    output: Callable[[Any], torch.Tensor] = lambda out: out.sample


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _latents_and_text(
    latents: tuple[int, ...], text: tuple[int, ...], timesteps: list[int]
) -> Callable[[torch.Generator], dict[str, Any]]:
    """Inputs of a denoiser that takes latents, text embeddings and a timestep per sample, nothing else."""

    def inputs(g: torch.Generator) -> dict[str, Any]:
        return {
            "hidden_states": _randn(g, *latents),
            "encoder_hidden_states": _randn(g, *text),
            "timestep": torch.tensor(timesteps),
        }

    return inputs


def _unet_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "sample": _randn(g, 2, 4, 16, 16),
        "timestep": torch.tensor([10, 20]),
        "encoder_hidden_states": _randn(g, 2, 7, 32),
    }


def _vae_inputs(g: torch.Generator) -> dict[str, Any]:
    return {"sample": _randn(g, 1, 3, 32, 32), "sample_posterior": False}


def _sd3_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 2, 4, 16, 16),
        "encoder_hidden_states": _randn(g, 2, 6, 32),
        "pooled_projections": _randn(g, 2, 64),
        "timestep": torch.tensor([10, 20]),
    }


def _flux_inputs(g: torch.Generator) -> dict[str, Any]:
    import diffusers

    img_ids, txt_ids = torch.rand(16, 3, generator=g), torch.zeros(8, 3)
    if _version(diffusers.__version__) < (0, 31):  # position ids were (batch, seq, 3) before 0.31
        img_ids, txt_ids = img_ids[None], txt_ids[None]
    return {
        "hidden_states": _randn(g, 1, 16, 16),
        "encoder_hidden_states": _randn(g, 1, 8, 32),
        "pooled_projections": _randn(g, 1, 32),
        "timestep": torch.tensor([1.0]),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def _qwen_inputs(g: torch.Generator) -> dict[str, Any]:
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0  # a padded prompt: the text mask must reach the backend
    return {
        "hidden_states": _randn(g, 2, 16, 16),
        "encoder_hidden_states": _randn(g, 2, 7, 16),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor([0.5, 0.7]),
        "img_shapes": [(1, 4, 4)] * 2,
        "txt_seq_lens": [7, 7],  # diffusers < 0.41 only: dropped below where forward does not take it
    }


def _hunyuan_video_inputs(g: torch.Generator) -> dict[str, Any]:
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    return {
        "hidden_states": _randn(g, 2, 4, 1, 8, 8),
        "timestep": torch.tensor([10.0, 30.0]),
        "encoder_hidden_states": _randn(g, 2, 6, 16),
        "pooled_projections": _randn(g, 2, 8),
        "encoder_attention_mask": mask,
        "guidance": torch.tensor([3.0, 3.0]),
    }


def _ltx_inputs(g: torch.Generator) -> dict[str, Any]:
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    return {
        "hidden_states": _randn(g, 2, 2 * 4 * 4, 4),
        "encoder_hidden_states": _randn(g, 2, 6, 16),
        "timestep": torch.tensor([10, 20]),
        "encoder_attention_mask": mask,
        "num_frames": 2,
        "height": 4,
        "width": 4,
    }


def _pixart_inputs(g: torch.Generator) -> dict[str, Any]:
    mask = torch.ones(2, 8)
    mask[1, 6:] = 0
    return {
        "hidden_states": _randn(g, 2, 4, 8, 8),
        "timestep": torch.tensor([10, 20]),
        "encoder_hidden_states": _randn(g, 2, 8, 8),
        "encoder_attention_mask": mask,
        "added_cond_kwargs": {"aspect_ratio": None, "resolution": None},
    }


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "unet",
            "UNet2DConditionModel",
            {
                "sample_size": 16,
                "in_channels": 4,
                "out_channels": 4,
                "layers_per_block": 1,
                "block_out_channels": (32, 64),
                "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
                "cross_attention_dim": 32,
                "attention_head_dim": 8,
                "norm_num_groups": 32,
            },
            _unet_inputs,
        ),
        Family(
            "vae",
            "AutoencoderKL",
            {
                "in_channels": 3,
                "out_channels": 3,
                "latent_channels": 4,
                "block_out_channels": (32, 64),
                "down_block_types": ("DownEncoderBlock2D",) * 2,
                "up_block_types": ("UpDecoderBlock2D",) * 2,
                "layers_per_block": 1,
                "norm_num_groups": 32,
                "sample_size": 32,
            },
            _vae_inputs,
        ),
        Family(
            "sd3",
            "SD3Transformer2DModel",
            {
                "sample_size": 16,
                "patch_size": 2,
                "in_channels": 4,
                "out_channels": 4,
                "num_layers": 2,
                "attention_head_dim": 8,
                "num_attention_heads": 4,
                "joint_attention_dim": 32,
                "caption_projection_dim": 32,
                "pooled_projection_dim": 64,
                "pos_embed_max_size": 16,
            },
            _sd3_inputs,
        ),
        Family(
            "flux",
            "FluxTransformer2DModel",
            {
                "patch_size": 1,
                "in_channels": 16,
                "num_layers": 1,
                "num_single_layers": 1,
                "attention_head_dim": 16,
                "num_attention_heads": 2,
                "joint_attention_dim": 32,
                "pooled_projection_dim": 32,
                "axes_dims_rope": (4, 4, 8),
            },
            _flux_inputs,
        ),
        Family(
            "qwenimage",
            "QwenImageTransformer2DModel",
            {
                "patch_size": 2,
                "in_channels": 16,
                "out_channels": 4,
                "num_layers": 2,
                "attention_head_dim": 16,
                "num_attention_heads": 2,
                "joint_attention_dim": 16,
                "axes_dims_rope": (8, 4, 4),
            },
            _qwen_inputs,
        ),
        Family(
            "wan",
            "WanTransformer3DModel",
            {
                "patch_size": (1, 2, 2),
                "num_attention_heads": 2,
                "attention_head_dim": 12,
                "in_channels": 4,
                "out_channels": 4,
                "text_dim": 16,
                "freq_dim": 256,
                "ffn_dim": 32,
                "num_layers": 2,
                "cross_attn_norm": True,
                "qk_norm": "rms_norm_across_heads",
                "rope_max_seq_len": 32,
            },
            _latents_and_text((1, 4, 2, 8, 8), (1, 6, 16), [10]),
        ),
        Family(
            "hunyuanvideo",
            "HunyuanVideoTransformer3DModel",
            {
                "in_channels": 4,
                "out_channels": 4,
                "num_attention_heads": 2,
                "attention_head_dim": 10,
                "num_layers": 1,
                "num_single_layers": 1,
                "num_refiner_layers": 1,
                "patch_size": 1,
                "patch_size_t": 1,
                "guidance_embeds": True,
                "text_embed_dim": 16,
                "pooled_projection_dim": 8,
                "rope_axes_dim": (2, 4, 4),
            },
            _hunyuan_video_inputs,
        ),
        Family(
            "ltx",
            "LTXVideoTransformer3DModel",
            {
                "in_channels": 4,
                "out_channels": 4,
                "num_attention_heads": 2,
                "attention_head_dim": 8,
                "cross_attention_dim": 16,
                "num_layers": 1,
                "qk_norm": "rms_norm_across_heads",
                "caption_channels": 16,
            },
            _ltx_inputs,
        ),
        Family(
            "cogvideox",
            "CogVideoXTransformer3DModel",
            {
                "num_attention_heads": 2,
                "attention_head_dim": 8,
                "in_channels": 4,
                "out_channels": 4,
                "time_embed_dim": 2,
                "text_embed_dim": 8,
                "num_layers": 1,
                "sample_width": 8,
                "sample_height": 8,
                "sample_frames": 8,
                "patch_size": 2,
                "temporal_compression_ratio": 4,
                "max_text_seq_length": 8,
            },
            _latents_and_text((2, 1, 4, 8, 8), (2, 8, 8), [10, 20]),
        ),
        Family(
            "auraflow",
            "AuraFlowTransformer2DModel",
            {
                "sample_size": 16,
                "patch_size": 2,
                "in_channels": 4,
                "num_mmdit_layers": 1,
                "num_single_dit_layers": 1,
                "attention_head_dim": 8,
                "num_attention_heads": 4,
                "caption_projection_dim": 32,
                "joint_attention_dim": 32,
                "out_channels": 4,
                "pos_embed_max_size": 64,
            },
            _latents_and_text((1, 4, 16, 16), (1, 8, 32), [10]),
        ),
        Family(
            "pixart",
            "PixArtTransformer2DModel",
            {
                "sample_size": 8,
                "num_layers": 1,
                "patch_size": 2,
                "attention_head_dim": 4,
                "num_attention_heads": 2,
                "in_channels": 4,
                "cross_attention_dim": 8,
                "out_channels": 8,
                "attention_bias": True,
                "activation_fn": "gelu-approximate",
                "num_embeds_ada_norm": 8,
                "norm_type": "ada_norm_single",
                "norm_elementwise_affine": False,
                "norm_eps": 1e-6,
                "use_additional_conditions": False,
                "caption_channels": None,
            },
            _pixart_inputs,
        ),
        Family(
            "sana",
            "SanaTransformer2DModel",
            {
                "patch_size": 1,
                "in_channels": 4,
                "out_channels": 4,
                "num_layers": 1,
                "attention_head_dim": 4,
                "num_attention_heads": 2,
                "num_cross_attention_heads": 2,
                "cross_attention_head_dim": 4,
                "cross_attention_dim": 8,
                "caption_channels": 8,
                "sample_size": 8,
            },
            _latents_and_text((2, 4, 8, 8), (2, 8, 8), [10, 20]),
        ),
    )
}


def missing_reason(family: Family) -> str | None:
    """Why the installed diffusers cannot build ``family`` (None when it can)."""
    import diffusers

    if not hasattr(diffusers, family.class_name):
        return f"diffusers {diffusers.__version__} has no {family.class_name}"
    return None


def build(family: Family, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The tiny model, in eval mode, with weights drawn from ``seed``; ``overrides`` replace config entries."""
    import diffusers

    torch.manual_seed(seed)
    model: torch.nn.Module = getattr(diffusers, family.class_name)(**{**family.config, **overrides})
    return model.eval()


def inputs(family: Family, seed: int = 0, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Fixed inputs; with ``model``, only those its forward takes (arguments come and go across versions)."""
    values = family.inputs(torch.Generator().manual_seed(seed))
    if model is not None:
        parameters = inspect.signature(model.forward).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            values = {k: v for k, v in values.items() if k in parameters}
    return values


def run(family: Family, model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """One forward pass on fixed inputs (no grad); returns the output tensor."""
    with torch.no_grad():
        return family.output(model(**inputs(family, seed, model)))


def run_pipeline(pipe: Any, steps: int = 2) -> torch.Tensor:
    """``steps`` denoising steps of a :mod:`attnpatch.testing.tiny` pipeline on a fixed prompt and seed; returns
    the images (batch, 3, 32, 32)."""
    from diffusers import FluxPipeline

    kwargs: dict[str, Any] = {"max_sequence_length": 16} if isinstance(pipe, FluxPipeline) else {}
    with torch.no_grad():
        return pipe(
            "a cat",
            num_inference_steps=steps,
            height=32,
            width=32,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        ).images
