"""FAKE ``kernels`` (Hugging Face kernel hub client): ``get_kernel`` serving the other fakes, never the network.

Installed as ``sys.modules["kernels"]``. Kept from the kernels API reference (0.14+): ``get_kernel(repo_id,
revision=None, version=None, backend=None, user_agent=None, trust_remote_code=False)``; revision and version are
exclusive and one is required; repositories of organisations not on the trusted list are refused unless
``trust_remote_code=True``. ``OFFLINE = True`` makes it fail like huggingface_hub without network or cache.
"""

from __future__ import annotations

import types

from fakes import fake_aiter, fake_flash_attn, fake_flash_attn_interface, fake_sageattention
from fakes.reference import attention, record

__version__ = "0.14.0"
OFFLINE = False
TRUSTED_ORGS = {"kernels-community"}
calls: list[dict[str, object]] = []


class LocalEntryNotFoundError(FileNotFoundError):
    """Like huggingface_hub's: no network, and no cached copy of the requested revision."""


def _flash_attn_4(
    q,
    k,
    v,
    softmax_scale=None,
    causal=False,
    window_size=(None, None),
    learnable_sink=None,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    return_lse=False,
):
    """FAKE FlashAttention-4 (flash_attn/cute/interface.py) flash_attn_func: returns (out, lse)."""
    assert q.shape[-1] % 8 == 0 and q.shape[-1] <= 256, "FAKE FA4: head_dim <= 256, divisible by 8"
    record(calls, "flash_attn_4", q=q, k=k, v=v, softmax_scale=softmax_scale, causal=causal)
    return attention(q, k, v, scale=softmax_scale, causal="bottom_right" if causal else None), None


def _sageattn3_blackwell(q, k, v, attn_mask=None, is_causal=False, per_block_mean=True, **kwargs):
    """FAKE sageattn3_blackwell: (batch, heads, seq, head_dim); subtracts the key mean in place like the real one."""
    assert q.shape[1] == k.shape[1], "FAKE sage3: as many key heads as query heads"
    k -= k.mean(dim=-2, keepdim=True)
    record(calls, "sageattn3_blackwell", q=q, k=k, v=v, is_causal=is_causal, kwargs=dict(kwargs))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return attention(q, k, v, causal="top_left" if is_causal else None).transpose(1, 2)


HUB = {
    "kernels-community/flash-attn2": fake_flash_attn,
    "kernels-community/flash-attn3": fake_flash_attn_interface,
    "kernels-community/flash-attn4": types.SimpleNamespace(flash_attn_func=_flash_attn_4),
    "kernels-community/aiter-flash-attn-ck": fake_aiter,
    "SageAttention/sage-attention": fake_sageattention,
    "SageAttention/sage-blackwell": types.SimpleNamespace(sageattn3_blackwell=_sageattn3_blackwell),
}


def get_kernel(repo_id, revision=None, version=None, backend=None, user_agent=None, trust_remote_code=False):
    """FAKE get_kernel: the module of ``repo_id`` at ``revision`` (or the ``v{version}`` branch)."""
    record(
        calls, "get_kernel", repo_id=repo_id, revision=revision, version=version, trust_remote_code=trust_remote_code
    )
    if revision is not None and version is not None:
        raise ValueError("revision and version cannot be used together")
    if revision is None and version is None:
        raise ValueError("Either version or revision must be specified")
    if OFFLINE:
        raise LocalEntryNotFoundError(
            "Cannot find an appropriate cached snapshot folder for the specified revision on the local disk and "
            "outgoing traffic has been disabled."
        )
    if repo_id.split("/")[0] not in TRUSTED_ORGS and trust_remote_code is not True:
        raise ValueError(f"{repo_id} is not published by a trusted organisation; pass trust_remote_code=True")
    return HUB[repo_id]
