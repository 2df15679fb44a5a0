"""Contract tests of Hub kernels: sources, opt-in, publisher trust, lock file, offline, layouts.

The kernels package needs the Hub to load anything, so most tests use its fake (tests/fakes/fake_kernels.py, which
mirrors kernels 0.19.1); the offline tests also run the real kernels package, which answers offline at once.
"""

from __future__ import annotations

import json
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fakes import fake_kernels
from kernel_setup import assert_matches, calls_of, expected, padding_mask, qkv

from attnpatch import cli
from attnpatch.backends import hub
from attnpatch.core import dispatch, registry, selection
from attnpatch.core.call import CallSpec
from attnpatch.errors import AttnpatchWarning, BackendUnavailable, UnsupportedCall

FLASH2_V3 = fake_kernels.commit("kernels-community/flash-attn2", "v3")


@pytest.fixture(autouse=True)
def lock_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No trust, remote-code or offline variables from the developer's shell; the lock file in a fresh folder."""
    for name in (
        "ATTNPATCH_TRUST_HUB_KERNELS",
        "ATTNPATCH_HUB_TRUST_REMOTE_CODE",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
    ):
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("ATTNPATCH_CACHE_DIR", str(tmp_path / "cache"))
    hub.forget_downloads()
    yield tmp_path / "cache" / "hub-lock.json"
    hub.forget_downloads()


def spec(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> CallSpec:
    return CallSpec.of(q, k, v, "none", 0.0, False, None)


# ----- sources ----------------------------------------------------------------------------------------------------


def test_hub_kernels_are_the_ones_diffusers_loads() -> None:
    diffusers = pytest.importorskip("diffusers")
    if not diffusers.__version__.startswith("0.42."):
        pytest.skip(f"hub.KERNELS is diffusers 0.42's table; diffusers {diffusers.__version__} is installed")
    from diffusers.models import attention_dispatch

    theirs = {
        backend.value: (config.repo_id, config.version, config.revision, config.function_attr)
        for backend, config in attention_dispatch._HUB_KERNELS_REGISTRY.items()
    }
    assert {name: (s.repo_id, s.version, None, s.function) for name, s in hub.KERNELS.items()} == theirs


def test_hub_docstring_states_the_transformers_fallbacks() -> None:
    transformers = pytest.importorskip("transformers")
    if not transformers.__version__.startswith("5.25."):
        pytest.skip(
            f"the docstring states transformers 5.25's fallbacks; transformers {transformers.__version__} is here"
        )
    utils = pytest.importorskip("transformers.modeling_flash_attention_utils")
    text = " ".join((hub.__doc__ or "").split())
    for repo_id in utils.FLASH_ATTN_KERNEL_FALLBACK.values():
        assert f"{repo_id} version {utils.FLASH_ATTN_KERNEL_VERSIONS[repo_id]}" in text


# ----- trust ------------------------------------------------------------------------------------------------------


def test_hub_needs_opt_in(fake_libraries: Any, pretend: Any) -> None:
    pretend("cuda", (8, 0))
    reasons = registry.get_backend("flash_hub").reasons
    assert any(
        "opt in with ATTNPATCH_TRUST_HUB_KERNELS=1 or attnpatch.backends.hub.trust_hub_kernels(True)" in r
        for r in reasons
    )
    q, k, v = qkv()
    with pytest.warns(AttnpatchWarning, match="downloads and runs code from the Hugging Face Hub"):
        dispatch.dispatch_attention(q, k, v, backend="flash_hub")
    assert not fake_kernels.calls, "nothing may be downloaded before the user opts in"


@pytest.mark.parametrize("value", ["1", "true", " TRUE ", "Yes", "on", "ON"])
def test_hub_opt_in_by_environment(
    value: str, fake_libraries: Any, pretend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATTNPATCH_TRUST_HUB_KERNELS", value)
    pretend("cuda", (8, 0))
    assert hub.trusted() and registry.get_backend("flash_hub").available


@pytest.mark.parametrize("value", ["", "0", "false", "No", " off "])
def test_hub_recognised_no_is_silent(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNPATCH_TRUST_HUB_KERNELS", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hub.trusted()


@pytest.mark.parametrize("value", ["disable", "never", "n", "False!", "2"])
def test_hub_unrecognised_trust_fails_closed_and_says_so_once(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: env.flag counted any unknown spelling as on, so 'disable' downloaded and ran Hub code."""
    monkeypatch.setenv("ATTNPATCH_TRUST_HUB_KERNELS", value)
    accepted = "set it to 1, true, yes, on (any case) to opt in, or '', '0', 'false', 'no', 'off' to stay out"
    with pytest.warns(AttnpatchWarning) as caught:
        assert not hub.trusted()
        assert not hub.trusted()
    (warning,) = [w for w in caught if issubclass(w.category, AttnpatchWarning)]
    assert str(warning.message) == (
        f"ATTNPATCH_TRUST_HUB_KERNELS={value!r} is not a recognised value, so Hub kernels stay off: {accepted}"
    )


def test_hub_passes_no_remote_code_trust_by_default(
    fake_libraries: Any, pretend: Any, strict: None, trusted: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: trust_remote_code=True on every download, over the kernels package's own publisher check."""
    monkeypatch.setattr(fake_kernels, "TRUSTED_PUBLISHERS", {"kernels-community"})
    pretend("cuda", (9, 0))
    q, k, v = qkv()
    refused = (
        r"the kernels package refused SageAttention/sage-attention@v3: ValueError: Kernel repository "
        r"'SageAttention/sage-attention' is not from a trusted publisher\..*; to run this publisher's code anyway: "
        r"attnpatch\.backends\.hub\.trust_remote_code\(\['SageAttention/sage-attention'\]\) or "
        r"ATTNPATCH_HUB_TRUST_REMOTE_CODE=SageAttention/sage-attention"
    )
    with pytest.raises(UnsupportedCall, match=refused):
        dispatch.dispatch_attention(q, k, v, backend="sage_hub")
    hub.trust_remote_code(["SageAttention/sage-attention"])
    dispatch.dispatch_attention(q, k, v, backend="sage_hub")
    dispatch.dispatch_attention(q, k, v, backend="flash_hub")
    passed = {call["repo_id"]: call["trust_remote_code"] for call in calls_of(fake_kernels, "get_kernel")}
    assert passed == {
        "SageAttention/sage-attention": ["SageAttention/sage-attention"],  # kernels >= 0.17: this repository only
        "kernels-community/flash-attn2": False,  # not named: kernels' own check
    }
    with pytest.raises(ValueError, match="takes Hub repository ids like 'org/name', got \\['flash-attn2'\\]"):
        hub.trust_remote_code(["flash-attn2"])


def test_hub_remote_code_by_environment(
    fake_libraries: Any, pretend: Any, strict: None, trusted: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATTNPATCH_HUB_TRUST_REMOTE_CODE", " SageAttention/sage-attention ,1, kernels-community/x")
    with pytest.warns(AttnpatchWarning, match="lists Hub repositories as org/name separated by commas; ignored: '1'"):
        assert hub.remote_code_repositories() == {"SageAttention/sage-attention", "kernels-community/x"}
    monkeypatch.setattr(fake_kernels, "__version__", "0.16.0")  # 0.14-0.16 warned about a list and ignored it
    monkeypatch.setattr(fake_kernels, "TRUSTED_PUBLISHERS", set())
    pretend("cuda", (9, 0))
    q, k, v = qkv()
    dispatch.dispatch_attention(q, k, v, backend="sage_hub")
    assert calls_of(fake_kernels, "get_kernel")[-1]["trust_remote_code"] is True


# ----- revisions: version branch, pins, the lock file -------------------------------------------------------------


def test_hub_downloads_once_at_the_version_diffusers_loads(
    fake_libraries: Any, pretend: Any, strict: None, trusted: None
) -> None:
    """Before: revision="v3" instead of get_kernel(repo_id, version=3), and trust_remote_code=True."""
    pretend("cuda", (8, 0))
    q, k, v = qkv()
    for _ in range(2):
        dispatch.dispatch_attention(q, k, v, backend="flash_hub")
    dispatch.dispatch_attention(q, k, v, attn_mask=padding_mask([12, 5], 12), backend="flash_varlen_hub")
    (download,) = calls_of(fake_kernels, "get_kernel")
    assert (download["repo_id"], download["version"], download["revision"]) == (
        "kernels-community/flash-attn2",
        3,
        None,
    )
    assert download["trust_remote_code"] is False
    hub.pin_hub_kernel("flash_hub", "0123abcd")
    dispatch.dispatch_attention(q, k, v, backend="flash_hub")
    assert calls_of(fake_kernels, "get_kernel")[-1]["revision"] == "0123abcd"
    with pytest.raises(ValueError, match="not a Hub backend"):
        hub.pin_hub_kernel("flash", "x")


def test_hub_lock_pins_downloads_to_commits(
    fake_libraries: Any,
    pretend: Any,
    strict: None,
    trusted: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    lock_file: Path,
) -> None:
    monkeypatch.setattr("huggingface_hub.HfApi", fake_kernels.HfApi)
    assert cli.main(["hub", "lock"]) == 0
    data = json.loads(lock_file.read_text())
    assert data["schema"] == "attnpatch.hub-lock/1" and set(data["kernels"]) == set(hub.KERNELS)
    assert data["kernels"]["flash_hub"] == {
        "repo_id": "kernels-community/flash-attn2",
        "revision": "v3",
        "sha": FLASH2_V3,
    }
    assert data["kernels"]["sage_hub"]["sha"] == fake_kernels.commit("SageAttention/sage-attention", "v3")
    asked = calls_of(fake_kernels, "list_repo_refs")
    assert len(asked) == 6 and {call["repo_type"] for call in asked} == {"kernel"}, "one question per repository"
    pretend("cuda", (8, 0))
    q, k, v = qkv()
    dispatch.dispatch_attention(q, k, v, backend="flash_hub")
    (download,) = calls_of(fake_kernels, "get_kernel")
    assert (download["revision"], download["version"]) == (FLASH2_V3, None)
    capsys.readouterr()
    assert cli.main(["list"]) == 0
    assert f"  flash_hub: kernels-community/flash-attn2@{FLASH2_V3}\n" in capsys.readouterr().out
    hub.pin_hub_kernel("flash_hub", "0123abcd")  # a pin wins over the lock
    assert hub.revision("flash_hub") == "0123abcd"


def test_hub_lock_offline_fails_with_one_line(
    fake_libraries: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], lock_file: Path
) -> None:
    monkeypatch.setattr("huggingface_hub.HfApi", fake_kernels.HfApi)
    fake_kernels.OFFLINE = True
    assert cli.main(["hub", "lock"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(
        "attnpatch hub lock: could not ask the Hugging Face Hub for the branches of kernels-community/flash-attn2 "
        "(ConnectError: [Errno -3] Temporary failure in name resolution); run it online"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["hub", "lock"]) == 1
    assert capsys.readouterr().err == (
        "attnpatch hub lock: HF_HUB_OFFLINE is set, and locking asks the Hub where each kernel version points: "
        "unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) and run it online\n"
    )
    assert not lock_file.exists()


def test_hub_lock_file_that_does_not_fit_is_ignored_loudly(lock_file: Path) -> None:
    lock_file.parent.mkdir(parents=True)
    entry = {"repo_id": "kernels-community/flash-attn2", "revision": "v1", "sha": "a" * 40}
    lock_file.write_text(json.dumps({"schema": "attnpatch.hub-lock/1", "kernels": {"flash_hub": entry}}))
    with pytest.warns(
        AttnpatchWarning, match="locks flash_hub to kernels-community/flash-attn2@v1, but this attnpatch"
    ):
        assert hub.revision("flash_hub") == "v3"
    lock_file.write_text("{not json")
    hub.forget_downloads()
    with pytest.warns(AttnpatchWarning, match="ignoring the Hub lock file .*JSONDecodeError"):
        assert hub.locked("flash_hub") is None


# ----- downloads: only for calls it can serve, offline, no network ------------------------------------------------


def test_hub_never_downloads_for_a_call_it_cannot_serve(fake_libraries: Any, pretend: Any, trusted: None) -> None:
    """Before: the download ran before the capability reasons were looked at."""
    pretend("cuda", (8, 0))
    q, k, v = qkv(dtype=torch.float32)
    with pytest.warns(AttnpatchWarning, match="'flash_hub' cannot serve this call"):
        dispatch.dispatch_attention(q, k, v, backend="flash_hub")
    pretend("cuda", (12, 0))
    q, k, v = qkv(dtype=torch.bfloat16, head_dim=96)
    reasons = registry.get_backend("sage_blackwell_hub").call_reasons(spec(q, k, v))
    assert any("takes head_dim 64 or 128, got 96" in reason for reason in reasons)
    assert not calls_of(fake_kernels, "get_kernel")


def test_hub_no_network_is_a_clear_reason(fake_libraries: Any, pretend: Any, trusted: None) -> None:
    pretend("cuda", (9, 0))
    fake_kernels.OFFLINE = True
    q, k, v = qkv()
    publisher = (
        "could not reach the Hub: ValueError: Kernel repository 'kernels-community/flash-attn2' could not verify"
    )
    with pytest.warns(AttnpatchWarning, match=f"the kernels package {publisher}"):
        out = dispatch.dispatch_attention(q, k, v, backend="flash_hub")
    assert_matches(out, expected(q, k, v))
    selection.set_strict(True)
    try:
        with pytest.raises(
            UnsupportedCall, match=r"could not reach the Hub.*set HF_HUB_OFFLINE=1 to load it from there"
        ):
            dispatch.dispatch_attention(q, k, v, scale=0.5, backend="flash_hub")
    finally:
        selection.set_strict(False)
    assert len(calls_of(fake_kernels, "get_kernel")) == 1, "a failed download is not retried on every call"
    hub.trust_remote_code(["kernels-community/flash-attn3"])  # past the publisher check: the branch lookup fails
    (reason,) = registry.get_backend("_flash_3_hub").call_reasons(spec(q, k, v))
    assert reason.startswith("the kernels package could not reach the Hub: ConnectError: [Errno -3]")


def test_hub_reached_but_refused_is_not_unreachable(
    fake_libraries: Any, pretend: Any, trusted: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub's RepositoryNotFoundError is an OSError: before, every OSError read 'could not reach'."""
    httpx = pytest.importorskip("httpx2")
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(repo_id: str, **kwargs: Any) -> Any:
        response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/api/kernels/{repo_id}"))
        raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=response)

    monkeypatch.setattr(fake_kernels, "get_kernel", missing)
    pretend("cuda", (8, 0))
    (reason,) = registry.get_backend("flash_hub").call_reasons(spec(*qkv()))
    assert reason.startswith("the kernels package could not load kernels-community/flash-attn2@v3: RepositoryNotFound")


def test_hub_offline_set_after_import_is_honoured(
    fake_libraries: Any, pretend: Any, strict: None, trusted: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE at import only; before, setting it later changed nothing."""
    from huggingface_hub import constants

    pretend("cuda", (9, 0))
    q, k, v = qkv()
    dispatch.dispatch_attention(q, k, v, backend="flash_hub")  # online: now in the cache
    hub.forget_downloads()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_matches(dispatch.dispatch_attention(q, k, v, backend="flash_hub"), expected(q, k, v))
    assert calls_of(fake_kernels, "get_kernel")[-1]["offline"] is True and constants.HF_HUB_OFFLINE is False
    offline = (
        r"the kernels package could not reach the Hub: HF_HUB_OFFLINE is set and kernels-community/flash-attn3@v1 is "
        r"not in the local cache \(ValueError: Version 1 of 'kernels-community/flash-attn3' is not available in the "
        r"local cache and Hugging Face Hub is in offline mode\..*\); download it while online first .*, or unset "
        "HF_HUB_OFFLINE"
    )
    for _ in range(2):
        (reason,) = registry.get_backend("_flash_3_hub").call_reasons(spec(q, k, v))
        assert re.fullmatch(offline, reason), reason
    assert len(calls_of(fake_kernels, "get_kernel")) == 3, "remembered per repository and revision"


def test_hub_offline_with_the_real_kernels_package(
    pretend: Any, trusted: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real kernels (0.19.1 here), HF_HUB_OFFLINE set after huggingface_hub's import: one reason, at once."""
    kernels = pytest.importorskip("kernels")
    monkeypatch.setitem(sys.modules, "kernels", kernels)
    monkeypatch.setenv("KERNELS_CACHE", str(tmp_path / "kernels"))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pretend("cuda", (8, 0))
    start = time.monotonic()
    with pytest.raises(
        BackendUnavailable, match="HF_HUB_OFFLINE is set and kernels-community/flash-attn2@v3 is not in"
    ):
        hub.load("flash_hub")
    assert time.monotonic() - start < 10, "offline fails at once, without the network's retries"


# ----- layouts ----------------------------------------------------------------------------------------------------


def test_hub_sage_blackwell_layout_and_copies(fake_libraries: Any, pretend: Any, strict: None, trusted: None) -> None:
    pretend("cuda", (12, 0))
    q, k, v = qkv(dtype=torch.bfloat16, heads_kv=4)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # a view of (B, H, S, D) memory, as transformers passes
    before = k.clone()
    assert_matches(dispatch.dispatch_attention(q, k, v, backend="sage_blackwell_hub"), expected(q, k, v))
    (call,) = calls_of(fake_kernels, "sageattn3_blackwell")
    assert call["q"][0] == (2, 4, 12, 64) and call["k"][0] == (2, 4, 12, 64), "(B, H, S, D)"
    assert torch.equal(k, before), "its in-place key update must land on a copy"
    q, k, v = qkv(dtype=torch.bfloat16, heads_kv=2)
    assert_matches(dispatch.dispatch_attention(q, k, v, backend="sage_blackwell_hub"), expected(q, k, v))
    assert calls_of(fake_kernels, "sageattn3_blackwell")[-1]["k"][0] == (2, 4, 12, 64), "key heads repeated"
    q80, k80, v80 = qkv(dtype=torch.bfloat16, head_dim=96)
    with pytest.raises(UnsupportedCall, match="takes head_dim 64 or 128, got 96"):
        dispatch.dispatch_attention(q80, k80, v80, backend="sage_blackwell_hub")


@pytest.mark.parametrize(
    ("capability", "reason"),
    [
        ((10, 0), "needs compute capability >= 12.0, found 10.0"),
        ((12, 1), "runs on compute capability <= 12.0, found 12.1"),
        ((12, 0), None),
    ],
)
def test_hub_sage_blackwell_runs_on_sm120_only(
    capability: tuple[int, int], reason: str | None, fake_libraries: Any, pretend: Any, trusted: None
) -> None:
    """mha_fwd refuses all but sm_120/121 and the Hub build targets sm_120a (needs the sage.py change)."""
    pretend("cuda", capability)
    reasons = registry.get_backend("sage_blackwell_hub").call_reasons(spec(*qkv(dtype=torch.bfloat16)))
    assert reasons == ([reason] if reason else [])
