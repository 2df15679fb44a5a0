#!/usr/bin/env bash
# The real-kernel leg (tests/real_kernels; what it found: docs/kernel-truth.md and docs/kernel-facts.md):
# - SageAttention 1.0.6's real Triton kernels, run on CPU by Triton's interpreter;
# - flash-attn 2.8.3's real Python interface over its PyTorch reference path (no CUDA build);
# - xFormers 0.0.35's own operator dispatcher, asked which operator would serve each call.
# Needs only python3 and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
started=$SECONDS

python3 -m venv .venv-kernels
py=.venv-kernels/bin/python
# torch is pinned: an unpinned torch pulls GBs of CUDA packages. triton and sageattention go in without their
# dependencies, so neither can replace that torch (today both declare none). triton 3.8.0 (Python 3.10-3.14) and
# 3.9.0 (3.11+) both run these kernels under TRITON_INTERPRET=1 with torch 2.13 on CPU.
"$py" -m pip install -q torch==2.13.0 numpy wrapt pytest
"$py" -m pip install -q --no-deps triton==3.8.0 sageattention==1.0.6 xformers==0.0.35
# flash-attn from its source distribution without the CUDA build: FORCE_BUILD stops setup.py looking for a prebuilt
# CUDA wheel (which fails on a CPU torch); the ROCm Triton backend's PyTorch reference path is what runs.
"$py" -m pip install -q wheel packaging psutil einops
FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE \
    "$py" -m pip install -q --no-deps --no-build-isolation flash-attn==2.8.3
"$py" -m pip install -q --no-deps -e .
"$py" -c "import torch; assert torch.__version__.startswith('2.13.0'), f'torch {torch.__version__} crept in'"

set +e
# ATTNPATCH_REAL_KERNELS=1: tests/real_kernels/conftest.py errors instead of skipping when a package is missing.
# The flash variables are read when flash_attn is first imported (xformers imports it too).
ATTNPATCH_REAL_KERNELS=1 FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE FLASH_ATTENTION_TRITON_AMD_REF=1 \
    "$py" -m pytest -q -p no:cacheprovider tests/real_kernels
status=$?
set -e
echo "real-kernel leg took $((SECONDS - started)) s"
# pytest exits 5 when it collected no test: that is a broken leg, not a pass.
if [ "$status" -ne 0 ]; then echo "pytest failed with status $status"; exit "$status"; fi
