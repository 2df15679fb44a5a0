"""Fakes of the kernel libraries that cannot run on a CPU machine, for the contract tests.

Each ``fake_<package>`` module implements the documented signature of the real package with reference math (see
reference.py) and records its calls; ``MODULES`` says under which real module names a test installs it into
``sys.modules`` (the fixture in tests/backends/conftest.py does that with monkeypatch). They are fakes: they
prove that an adapter maps its arguments, layouts and masks the way the real library documents, not that the
real kernel is fast or exact. tests/test_gpu.py runs the real libraries where they are installed.
"""

from __future__ import annotations

import types

from fakes import (
    fake_aiter,
    fake_flash_attn,
    fake_flash_attn_cute,
    fake_flash_attn_interface,
    fake_kernels,
    fake_sageattention,
    fake_sageattention_v1,
    fake_torch_npu,
    fake_torch_xla,
    fake_xformers,
)

MODULES: dict[str, types.ModuleType] = {
    "flash_attn": fake_flash_attn,
    "flash_attn_interface": fake_flash_attn_interface,
    "flash_attn.cute": fake_flash_attn_cute,
    "sageattention": fake_sageattention,
    "xformers": fake_xformers,
    "xformers.ops": fake_xformers,
    "xformers.ops.fmha": fake_xformers.fmha,
    "aiter": fake_aiter,
    "torch_xla": fake_torch_xla,
    "torch_xla.experimental": fake_torch_xla,
    "torch_xla.experimental.custom_kernel": fake_torch_xla,
    "torch_npu": fake_torch_npu,
    "kernels": fake_kernels,
}

ALL = (
    fake_aiter,
    fake_flash_attn,
    fake_flash_attn_cute,
    fake_flash_attn_interface,
    fake_kernels,
    fake_sageattention,
    fake_sageattention_v1,
    fake_torch_npu,
    fake_torch_xla,
    fake_xformers,
)


def reset() -> None:
    """Forget recorded calls and switches, so each test starts from the documented defaults."""
    for module in ALL:
        module.calls.clear()
    fake_flash_attn_interface.BETA = False
    fake_kernels.OFFLINE = False
    fake_sageattention.core.SM80_ENABLED = fake_sageattention.core.SM89_ENABLED = True
    fake_sageattention.core.SM90_ENABLED = True
