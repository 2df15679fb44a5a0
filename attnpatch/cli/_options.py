"""The runner's option values, checked before the script starts. Standard library only: no torch.

``python -m attnpatch --backend flsh script.py`` must fail at once, with status 2 and the option named as the user
gave it, not an hour into the script, and not after a second spent importing torch to ask the registry. So the
names of the built-in backends and their aliases are listed here; ``tests/cli/test_runner.py`` keeps the lists
equal to the registry's. A report path, a verify interval and a verify action are checked the way
:mod:`attnpatch.report` and :mod:`attnpatch.verify` check them (their tests compare the two).
"""

from __future__ import annotations

import os

# Every backend registered by attnpatch.backends, and every alias of one (the registry's canonical() rules:
# case-insensitive, '-' same as '_').
BACKEND_NAMES = frozenset(
    [
        "_flash_3",
        "_flash_3_hub",
        "_flash_3_varlen_hub",
        "_flash_varlen_3",
        "_native_cudnn",
        "_native_efficient",
        "_native_flash",
        "_native_math",
        "_native_npu",
        "_native_xla",
        "_sage_qk_int8_pv_fp16_cuda",
        "_sage_qk_int8_pv_fp16_triton",
        "_sage_qk_int8_pv_fp8_cuda",
        "_sage_qk_int8_pv_fp8_cuda_sm90",
        "aiter",
        "aiter_fa2_hub",
        "flash",
        "flash_4",
        "flash_4_hub",
        "flash_hub",
        "flash_varlen",
        "flash_varlen_hub",
        "flex",
        "native",
        "sage",
        "sage_blackwell_hub",
        "sage_hub",
        "sage_varlen",
        "xformers",
    ]
)
BACKEND_ALIASES = frozenset(
    [
        "_flash_3_varlen",
        "_native",
        "_native_math_sdpa",
        "aiter_attn",
        "aiter_flash",
        "cudnn",
        "default",
        "efficient",
        "fa2",
        "fa3",
        "fa4",
        "flash2",
        "flash3",
        "flash3_varlen",
        "flash4",
        "flash_3",
        "flash_attention",
        "flash_attn",
        "flash_attn_2",
        "flash_attn_3",
        "flash_attn_4",
        "flash_attn_varlen",
        "flash_varlen_3",
        "flex_attention",
        "flex_attn",
        "flexattention",
        "math",
        "mem_efficient",
        "mem_efficient_xformers",
        "native_npu",
        "native_xla",
        "npu",
        "npu_fusion_attention",
        "sage_attention",
        "sage_attn",
        "sage_attn_varlen",
        "sageattention",
        "sageattn",
        "sageattn_varlen",
        "sdpa",
        "torch",
        "xformers_attn",
        "xla",
        "xla_flash",
    ]
)
AUTO = "auto"
VERIFY_ACTIONS = ("warn", "fallback", "raise")
_ON_WORDS = frozenset({"", "1", "true", "yes", "on"})


def backend_problem(spec: str) -> str | None:
    """Why ``spec`` (a name, an alias, ``auto`` or a chain ``a,b,c``) names no built-in backend; None when it does."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        return f"{spec!r} names no backend: give a name such as native or flash, or a chain such as sage,native"
    for part in parts:
        key = part.lower().replace("-", "_")
        if part in BACKEND_NAMES or key in BACKEND_NAMES or key in BACKEND_ALIASES or key == AUTO:
            continue
        import difflib

        choices = sorted(BACKEND_NAMES | BACKEND_ALIASES | {AUTO})
        close = difflib.get_close_matches(key, choices, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        return (
            f"unknown attention backend {part!r}: {hint}valid names: {', '.join(choices)} "
            "(run `python -m attnpatch list` to see which are available here; a backend your script registers "
            "itself is selected in the script, with attnpatch.set_default_backend)"
        )
    return None


def report_problem(value: str) -> str | None:
    """Why the report cannot be written to ``value`` (a path, or "1" for the table only); None when it can."""
    if value.strip().lower() in _ON_WORDS:
        return None
    target = os.path.abspath(os.path.expanduser(value))
    if os.path.isdir(target):
        return f"cannot write the report to {target!r}: it is a folder; pass a file name such as {target}/run.json"
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        return (
            f"cannot write the report to {target!r}: folder {parent!r} does not exist; create it or pass another path"
        )
    existed = os.path.exists(target)
    try:
        with open(target, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        return f"cannot write the report to {target!r}: {exc.strerror or exc}; pass a writable path"
    if not existed:
        os.unlink(target)  # only probed; the report is written at exit
    return None


def verify_problem(value: str) -> str | None:
    """Why ``value`` is no verify interval (1: first call per module and shape, N: every Nth); None when it is."""
    if value.strip().lower() in _ON_WORDS:
        return None
    try:
        every = int(value)
    except ValueError:
        every = 0
    if every < 1:
        return (
            f"verify interval {value!r} is not a positive integer: use 1 (first call of each module and shape) "
            "or N (every Nth call)"
        )
    return None


def verify_action_problem(value: str) -> str | None:
    """Why ``value`` is no verify action; None when it is one."""
    if value.strip().lower() in VERIFY_ACTIONS:
        return None
    return f"verify action {value!r} is not one of {', '.join(VERIFY_ACTIONS)}"
