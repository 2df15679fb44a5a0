"""Generate an image with FLUX.1 [schnell] — a plain diffusers script that knows nothing about attnpatch.

Run it unchanged under any backend (needs a CUDA GPU with ~24 GB, and `pip install diffusers transformers
accelerate sentencepiece protobuf`; the weights download from the Hugging Face Hub on first use):

    python -m attnpatch examples/flux_generate.py --backend flash --report
    ATTNPATCH_BACKEND=sage,flash,native ATTNPATCH_VERIFY=1 python examples/flux_generate.py
    python examples/flux_generate.py --attnpatch flash          # the one-line attnpatch.apply variant below
"""

import argparse

import torch
from diffusers import FluxPipeline

parser = argparse.ArgumentParser()
parser.add_argument("--prompt", default="a red fox in fresh snow, golden hour, photograph")
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--out", default="flux.png")
parser.add_argument("--attnpatch", metavar="BACKEND", help="route attention with attnpatch.apply(pipe, backend=...)")
args = parser.parse_args()

pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", torch_dtype=torch.bfloat16).to("cuda")
if args.attnpatch:
    import attnpatch

    attnpatch.apply(pipe, backend=args.attnpatch)  # the only line a script needs to add

image = pipe(
    args.prompt,
    num_inference_steps=args.steps,
    guidance_scale=0.0,
    height=1024,
    width=1024,
    max_sequence_length=256,
    generator=torch.Generator("cpu").manual_seed(0),
).images[0]
image.save(args.out)
print(f"saved {args.out}")
