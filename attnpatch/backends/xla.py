"""``_native_xla``: the Pallas FlashAttention kernel of torch_xla (>= 2.4) on TPU.

From torch_xla/experimental/custom_kernel.py: ``flash_attention(q, k, v, causal=False, q_segment_ids=None,
kv_segment_ids=None, sm_scale=1.0, *, ab=None, ...)`` on (batch, heads, seq, head_dim) tensors with as many key
heads as query heads, the same head dim for v. Its ``sm_scale`` defaults to 1.0, not 1/sqrt(head_dim): diffusers
pre-divides q by sqrt(head_dim) and drops a caller's ``scale`` there, a silently wrong answer. Here the scale is
always passed. The Pallas kernel's causal mask is ``col <= row`` on absolute positions, i.e. top-left like SDPA.
An autograd Function with a backward; torch_xla makes it traceable itself, so it is called directly, without a
custom op.

Versions (custom_kernel.py per tag): 2.2 has no custom_kernel.py; 2.3's ``flash_attention(q, k, v,
segment_ids=None, causal=False)`` has no scale and no backward; 2.4.0 (l. 162-438) brings ``FlashAttention``
with ``sm_scale`` and a backward, hence the minimum 2.4 (kernel-facts names 2.6 only because 2.4 and 2.5 were not
read there; their source has both). Keys are processed in blocks of ``min(512, seq_kv)``
(``DEFAULT_BLOCK_SIZES["block_k_major"]``), and JAX's kernel (jax/experimental/pallas/ops/tpu/flash_attention.py,
``_verify_block``) requires the block to divide seq_kv: 2.4-2.6 raise ValueError for seq_kv > 512 that is not a
multiple of 512; 2.7-2.9 (``_fa_custom_forward_single_device``) pad k/v with zeros to the block and pad only an
``ab`` bias with -inf, so without a bias the softmax also runs over the zero keys; their backward gets the unpadded
keys and raises. A zero ``ab`` would make that forward exact, but ``ab`` is (batch, heads, seq_q, seq_kv): an
attention-matrix-sized tensor per call (86 GB at Wan's 32760 tokens), so such calls get a reason instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from attnpatch.backends import _probe
from attnpatch.backends._define import define
from attnpatch.core.call import MASK_NONE, CallSpec, SdpaArgs
from attnpatch.core.capabilities import Capabilities
from attnpatch.core.versions import installed_version, version_tuple

if TYPE_CHECKING:
    from typing_extensions import Unpack

XLA_VERSION = "2.4"
KERNEL_MODULE = "torch_xla.experimental.custom_kernel"
KEY_BLOCK = 512  # FlashAttention.DEFAULT_BLOCK_SIZES["block_k_major"] and ["block_k"]
PADS_KEYS_FROM = (2, 7)  # _fa_custom_forward_single_device pads k/v to the block from 2.7.0 on
LANES = 128  # MIN_BLOCK_SIZE of the Pallas kernel
# torch-xla declares no torch requirement, yet its binary runs only with the torch of its own release ("undefined
# symbol" otherwise): the install command names that release (PyPI's newest torch-xla is 2.9.0).
XLA_HINT = (
    f"pip install 'torch-xla[tpu]=={_probe.torch_release()}' (torch-xla runs only with the torch release of its "
    "own version; for an older one install both: pip install 'torch==2.9.0' 'torch-xla[tpu]==2.9.0')"
)


def native_xla(*args: Unpack[SdpaArgs]) -> torch.Tensor:
    """torch_xla flash_attention on q (batch, seq_q, heads, head_dim), k/v (batch, seq_kv, heads_kv, head_dim)."""
    query, key, value, _, _, is_causal, scale, _ = args
    flash_attention = _probe.lib(KERNEL_MODULE).flash_attention
    heads, heads_kv = query.shape[2], key.shape[2]
    if heads_kv != heads:  # the kernel wants one key head per query head
        key = key.repeat_interleave(heads // heads_kv, dim=2)
        value = value.repeat_interleave(heads // heads_kv, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    sm_scale = scale if scale is not None else query.shape[-1] ** -0.5
    return flash_attention(q, k, v, causal=is_causal, sm_scale=sm_scale).transpose(1, 2)


def _version() -> tuple[int, ...]:
    # The imported torch_xla's __version__ (this check runs after the import), else its metadata; () if unknown.
    found = installed_version("torch_xla", "torch-xla")
    return version_tuple(found) if found else ()


def xla_reasons(call: CallSpec) -> list[str]:
    """What the Pallas kernel of the installed torch_xla gets wrong or raises on (see the module docstring)."""
    reasons = []
    if call.head_dim > LANES and call.head_dim % LANES:
        reasons.append(
            f"head_dim {call.head_dim} > {LANES} is not a multiple of {LANES} (the Pallas kernel raises "
            f"NotImplementedError: head_dim should be a multiple of {LANES} if larger)"
        )
    if call.seq_kv <= KEY_BLOCK or call.seq_kv % KEY_BLOCK == 0:
        return reasons
    version = _version()
    shown = ".".join(map(str, version)) if version else "(version unknown)"
    head = f"seq_kv {call.seq_kv} > {KEY_BLOCK} is not a multiple of {KEY_BLOCK}"
    if not version or version < PADS_KEYS_FROM:
        reasons.append(
            f"{head}: torch_xla {shown}'s Pallas kernel raises ValueError (kv_seq_len should be divisible by "
            f"block_k_major={KEY_BLOCK}); pad the sequence to a multiple of {KEY_BLOCK}"
        )
    elif call.needs_grad:
        reasons.append(
            f"{head}: torch_xla {shown}'s backward gets the unpadded keys and raises ValueError (kv_seq_len "
            f"should be divisible by block_k_major_dkv={KEY_BLOCK}); pad the sequence to a multiple of {KEY_BLOCK}"
        )
    elif not (call.is_causal and call.seq_q <= call.seq_kv):
        # Causal with seq_q <= seq_kv is exact: the padded keys lie right of every query row's diagonal.
        reasons.append(
            f"{head}: torch_xla {shown} pads keys and values with zeros to a multiple of {KEY_BLOCK} without "
            "masking them, so the softmax would include the zero keys; pad the sequence to a multiple of "
            f"{KEY_BLOCK}"
        )
    return reasons


define(
    "_native_xla",
    native_xla,
    family="xla",
    caps=Capabilities(
        devices=frozenset({"xla"}),
        dtypes=frozenset({torch.float32, torch.bfloat16}),
        same_v_head_dim=True,  # "V model dimension unequal to KV model dimension unsupported"
        masks=frozenset({MASK_NONE}),
        dropout=False,
        priority=50,  # on XLA devices the alternative is native SDPA (10)
    ),
    requires=_probe.requires("torch_xla", "torch-xla", XLA_VERSION, device=None, hint=XLA_HINT),
    check=_probe.library_check(KERNEL_MODULE, xla_reasons, replayed=False),  # called directly, not through the op
    description="torch_xla Pallas flash_attention (TPU); custom scale honoured, GQA by repeating key heads",
    aliases=("xla", "xla_flash", "native_xla"),
)
