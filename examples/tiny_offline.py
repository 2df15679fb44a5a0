"""The same job as examples/flux_generate.py on tiny models built locally: no GPU, no network, a second or two.

    python -m attnpatch examples/tiny_offline.py --backend _native_math --report
    ATTNPATCH_BACKEND=_native_flash,native ATTNPATCH_VERIFY=1 python examples/tiny_offline.py
    python examples/tiny_offline.py --attnpatch _native_math     # the one-line attnpatch.apply variant

The pipelines are real diffusers/transformers classes with random weights (attnpatch.testing.tiny), so the image is
noise, but every attention call a full-size model makes is made here too.
"""

import argparse

import torch

from attnpatch.testing import tiny

parser = argparse.ArgumentParser()
parser.add_argument("--prompt", default="a red fox")  # the tiny tokenizers keep 16 tokens
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--out", default="tiny-flux.png")
parser.add_argument("--attnpatch", metavar="BACKEND", help="route attention with attnpatch.apply(pipe, backend=...)")
args = parser.parse_args()

pipe = tiny.flux_pipeline()
model, tokenizer = tiny.llama()
if args.attnpatch:
    import attnpatch

    attnpatch.apply(pipe, backend=args.attnpatch)  # the only line a script needs to add
    attnpatch.apply(model, backend=args.attnpatch)

image = pipe(
    args.prompt, num_inference_steps=args.steps, height=32, width=32, max_sequence_length=16, generator=tiny.generator()
).images[0]
image.resize((128, 128)).save(args.out)
print(f"saved {args.out}")

batch = tokenizer(["hello world, how are you", "hi"], return_tensors="pt", padding=True)
with torch.no_grad():
    tokens = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print("llama:", tokenizer.batch_decode(tokens[:, batch["input_ids"].shape[1] :]))
