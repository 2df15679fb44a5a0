"""A user script for the runner's report tests: a tiny Stable Diffusion pipeline (attnpatch.testing.tiny), 2 steps.

    python tiny_sd.py [bmm]

bmm: the UNet runs diffusers' AttnProcessor (bmm + softmax, what set_default_attn_processor() installs), whose
layers attnpatch leaves alone. The script imports no attnpatch routing: under the runner it is routed as it is.
"""

import sys

from attnpatch.testing import tiny


def run(pipe):
    return pipe("a red cube", num_inference_steps=2, generator=tiny.generator(), output_type="pt").images


def build(bmm: bool = False):
    pipe = tiny.stable_diffusion_pipeline()
    if bmm:
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
    return pipe


if __name__ == "__main__":
    image = run(build("bmm" in sys.argv[1:]))
    print(f"image {tuple(image.shape)} sum={image.double().sum().item():.6f}", flush=True)
