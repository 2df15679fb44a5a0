"""FAKE ``kernels`` (Hugging Face kernel hub client): ``get_kernel`` serving the other fakes, never the network.

Installed as ``sys.modules["kernels"]``. Mirrors kernels 0.19.1 (``_internals/load.py`` get_kernel, ``_versions.py``,
``resolver.py``, ``hf_hub.py``), the version installed beside the tests (the real one needs the Hub):

- ``get_kernel(repo_id, *, revision=None, version=None, backend=None, user_agent=None, trust_remote_code=False,
  check_arch=True)``; exactly one of revision and version, else ValueError (``revision_or_version``).
- ``version=N`` loads the branch ``vN``; a 40-hex revision is a commit.
- ``huggingface_hub.constants.HF_HUB_OFFLINE`` is read at each call (load.py: ``local_files_only=
  constants.HF_HUB_OFFLINE``). Offline, the publisher check is skipped and only what was downloaded before loads;
  otherwise: ``version`` -> ValueError "... is not available in the local cache and Hugging Face Hub is in offline
  mode ...", a commit -> FileNotFoundError "Cannot find a local snapshot ...", another revision -> ValueError
  "Cannot resolve revision ... offline mode ...". All at once, no network.
- Online, the publisher check comes first (``HubResolver.resolve``): ``trust_remote_code=True`` allows any
  repository, a list allows the repositories in it, anything else only organisations the Hub marks as trusted
  kernel publishers (:data:`TRUSTED_PUBLISHERS`, a stand-in for that Hub state: which organisations are marked is
  not in any source; the fake marks the two diffusers 0.42 loads from, tests change it) -> ValueError "... is not
  from a trusted publisher ...".
- ``OFFLINE = True`` means no network (DNS failure): the publisher check raises ValueError "... could not verify
  publisher trust status ..." from httpx's ConnectError; past it (trusted), the branch lookup raises ConnectError
  itself (the real one after ~25 s of retries). Not an OSError.

:class:`HfApi` stands in for huggingface_hub 2.4.0's ``HfApi.list_repo_refs`` (what ``python -m attnpatch hub lock``
and kernels' ``version=`` resolution call), returning the real ``GitRefs``.
"""

from __future__ import annotations

import hashlib
import re
import types

from fakes import fake_aiter, fake_flash_attn, fake_flash_attn_cute, fake_flash_attn_interface, fake_sageattention
from fakes.reference import attention, record

__version__ = "0.19.1"
OFFLINE = False
TRUSTED_PUBLISHERS = {"kernels-community", "SageAttention"}
calls: list[dict[str, object]] = []


class ConnectError(Exception):
    """Like httpx (httpx2 here, huggingface_hub 2.4.0's transport) ConnectError: not an OSError."""


def _sageattn3_blackwell(q, k, v, attn_mask=None, is_causal=False, per_block_mean=True, **kwargs):
    """FAKE sageattn3_blackwell (thu-ml/SageAttention sageattention3_blackwell/sageattn3/api.py, blackwell/api.cu).

    (batch, heads, seq, head_dim); ``attn_mask`` and unknown keywords ignored; scale 1/sqrt(head_dim); head dims
    >= 256 go to SDPA; the kernel takes 64 and 128 only and equal query and key heads; key mean subtracted in place.
    """
    if q.size(-1) >= 256:
        return attention(*(t.transpose(1, 2) for t in (q, k, v)), causal="top_left" if is_causal else None)
    assert q.shape[-1] in (64, 128), "FAKE sage3: Only support head size 64, 128, and 256 for now"
    assert q.shape[1] == k.shape[1], "FAKE sage3: We do not support MQA/GQA yet"
    k -= k.mean(dim=-2, keepdim=True)
    record(calls, "sageattn3_blackwell", q=q, k=k, v=v, is_causal=is_causal, kwargs=dict(kwargs))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return attention(q, k, v, causal="top_left" if is_causal else None).transpose(1, 2)


HUB = {
    "kernels-community/flash-attn2": fake_flash_attn,
    "kernels-community/flash-attn3": fake_flash_attn_interface,
    "kernels-community/flash-attn4": fake_flash_attn_cute,  # the Hub build packages the same interface
    "kernels-community/aiter-flash-attn-ck": fake_aiter,
    "SageAttention/sage-attention": fake_sageattention,
    "SageAttention/sage-blackwell": types.SimpleNamespace(sageattn3_blackwell=_sageattn3_blackwell),
}
# The version branches each repository has (as diffusers 0.42.1 loads them); their commits are made up.
BRANCHES = {
    "kernels-community/flash-attn2": ("main", "v1", "v2", "v3", "v4"),
    "kernels-community/flash-attn3": ("main", "v1", "v2"),
    "kernels-community/flash-attn4": ("main", "v0", "v1"),
    "kernels-community/aiter-flash-attn-ck": ("main", "v1"),
    "SageAttention/sage-attention": ("main", "v1", "v2", "v3"),
    "SageAttention/sage-blackwell": ("main", "v1"),
}


def commit(repo_id: str, branch: str) -> str:
    """The (made up, stable) commit the branch ``branch`` of ``repo_id`` points at."""
    return hashlib.sha1(f"{repo_id}@{branch}".encode()).hexdigest()


def _offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def get_kernel(
    repo_id,
    *,
    revision=None,
    version=None,
    backend=None,
    user_agent=None,
    trust_remote_code=False,
    check_arch=True,
):
    """FAKE get_kernel: the module of ``repo_id`` at ``revision`` (or the ``v{version}`` branch)."""
    offline = _offline()
    record(
        calls,
        "get_kernel",
        repo_id=repo_id,
        revision=revision,
        version=version,
        trust_remote_code=trust_remote_code,
        offline=offline,
    )
    if revision is not None and version is not None:
        raise ValueError("Only one of `revision` or `version` must be specified.")
    if revision is None and version is None:
        raise ValueError("A kernel version or revision must be specified.")
    ref = f"v{version}" if version is not None else revision
    if offline:
        if (repo_id, ref) in _downloaded():
            return HUB[repo_id]
        if version is not None:
            raise ValueError(
                f"Version {version} of '{repo_id}' is not available in the local cache and Hugging Face Hub is in "
                "offline mode. Download the kernel while online first, or pass an explicit `revision=<commit>`."
            )
        if re.fullmatch(r"[0-9a-f]{40}", revision):
            raise FileNotFoundError(
                f"Cannot find a local snapshot for {repo_id} (revision: {revision}). When Hugging Face Hub is in "
                "offline mode the kernel must already be present in the local cache."
            )
        raise ValueError(
            f"Cannot resolve revision '{revision}' of '{repo_id}' to a commit: the ref is not in the local cache "
            "and Hugging Face Hub is in offline mode. Download the kernel while online first, or pass an explicit "
            "`revision=<commit>`."
        )
    allowed = trust_remote_code is True or (isinstance(trust_remote_code, list) and repo_id in trust_remote_code)
    if not allowed and OFFLINE:
        raise ValueError(
            f"Kernel repository '{repo_id}' could not verify publisher trust status. Set trust_remote_code=True or "
            "add the repository ID to the trust_remote_code allowlist to allow loading kernels from untrusted sources."
        ) from ConnectError("[Errno -3] Temporary failure in name resolution")
    if not allowed and repo_id.split("/")[0] not in TRUSTED_PUBLISHERS:
        raise ValueError(
            f"Kernel repository '{repo_id}' is not from a trusted publisher. Set trust_remote_code=True or add the "
            "repository ID to the trust_remote_code allowlist to allow loading kernels from untrusted sources."
        )
    if OFFLINE:
        raise ConnectError("[Errno -3] Temporary failure in name resolution")
    record(calls, "download", repo_id=repo_id, ref=ref)  # now in the (fake) cache
    return HUB[repo_id]


def _downloaded() -> set[tuple[str, str]]:
    return {(call["repo_id"], call["ref"]) for call in calls if call["function"] == "download"}  # type: ignore[misc]


class HfApi:
    """FAKE huggingface_hub 2.4.0 ``HfApi``: ``list_repo_refs`` of the repositories in :data:`BRANCHES`."""

    def list_repo_refs(self, repo_id, *, repo_type=None, include_pull_requests=False, token=None):
        from huggingface_hub.hf_api import GitRefInfo, GitRefs

        record(calls, "list_repo_refs", repo_id=repo_id, repo_type=repo_type)
        if OFFLINE:
            raise ConnectError("[Errno -3] Temporary failure in name resolution")
        if repo_type != "kernel" or repo_id not in BRANCHES:
            raise LookupError(f"404 Client Error. Repository Not Found for url: .../api/{repo_type}s/{repo_id}/refs")
        branches = [
            GitRefInfo(name=b, ref=f"refs/heads/{b}", target_commit=commit(repo_id, b)) for b in BRANCHES[repo_id]
        ]
        return GitRefs(branches=branches, converts=[], tags=[])
