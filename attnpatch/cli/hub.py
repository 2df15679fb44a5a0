"""``python -m attnpatch hub lock [--path PATH]``: fix the commit each Hub kernel backend downloads.

Each Hub backend loads the newest commit of a version branch (``kernels-community/flash-attn2`` version 3: branch
``v3``), which moves when its authors publish a build. ``hub lock`` asks the Hub where each branch points now
(``HfApi().list_repo_refs(repo_id, repo_type="kernel")``, as kernels resolves ``version=N``) and writes the commits to
``attnpatch.backends.hub.lock_path()`` (or ``--path``); every later process that finds the file downloads exactly
those commits, and ``python -m attnpatch list`` shows them. Needs the network: without it, it fails with one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from attnpatch.backends import hub


def main(argv: Sequence[str]) -> int:
    """``python -m attnpatch hub lock [--path PATH]``: resolve the Hub kernels' versions to commits, write them."""
    parser = argparse.ArgumentParser(
        prog="python -m attnpatch hub",
        description="Resolve each Hub kernel backend's version to the commit it points at now, and pin it there.",
    )
    parser.add_argument("action", choices=["lock"], help="lock: write the commits to the lock file")
    parser.add_argument("--path", default=None, help=f"where to write it (default: {hub.lock_path()})")
    opts = parser.parse_args(list(argv))
    try:
        kernels = resolve()
    except LockError as exc:
        print(f"attnpatch hub lock: {exc}", file=sys.stderr)
        return 1
    path = hub.write_lock(kernels, opts.path)
    width = max(len(name) for name in kernels)
    for name, entry in kernels.items():
        print(f"{name:<{width}}  {entry['repo_id']}@{entry['revision']} -> {entry['sha']}")
    print(f"wrote {path}")
    return 0


class LockError(Exception):
    """Why the commits could not be resolved, in one line."""


def resolve(api: Any = None) -> dict[str, dict[str, str]]:
    """Backend name -> ``{"repo_id", "revision", "sha"}``: where each version branch points on the Hub now.

    ``api``: a ``huggingface_hub.HfApi`` (default: a new one). Raises LockError offline or without the network.
    """
    if hub.offline_requested():
        raise LockError(
            "HF_HUB_OFFLINE is set, and locking asks the Hub where each kernel version points: "
            "unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) and run it online"
        )
    if api is None:
        try:
            from huggingface_hub import HfApi
        except ImportError as exc:
            raise LockError(f"needs huggingface_hub ({exc}): pip install kernels") from exc
        api = HfApi()
    commits: dict[tuple[str, str], str] = {}
    kernels = {}
    for name, spec in hub.KERNELS.items():
        key = (spec.repo_id, spec.branch)
        if key not in commits:
            commits[key] = _branch_commit(api, spec)
        kernels[name] = {"repo_id": spec.repo_id, "revision": spec.branch, "sha": commits[key]}
    return kernels


def _branch_commit(api: Any, spec: hub.HubKernel) -> str:
    # What get_kernel(repo_id, version=N) resolves (kernels _versions.py _get_available_versions): the branch vN.
    try:
        refs = api.list_repo_refs(spec.repo_id, repo_type="kernel")
    except Exception as exc:  # no network, a proxy, the Hub down: whatever the transport raises, say it in one line
        detail = " ".join(str(exc).split())
        raise LockError(
            f"could not ask the Hugging Face Hub for the branches of {spec.repo_id} ({type(exc).__name__}: "
            f"{detail}); run it online"
        ) from exc
    for branch in refs.branches:
        if branch.name == spec.branch:
            return str(branch.target_commit)
    found = ", ".join(sorted(branch.name for branch in refs.branches)) or "none"
    raise LockError(f"{spec.repo_id} has no branch {spec.branch} (version {spec.version}); its branches: {found}")
