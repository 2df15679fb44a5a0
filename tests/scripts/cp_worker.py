"""A torchrun worker (gloo, CPU) for diffusers' context parallelism routed by attnpatch; rank 0 prints one JSON line.

    torchrun --standalone --nproc_per_node 2 cp_worker.py CASE [CASE ...]

Each CASE runs in turn on the same process group, with attnpatch uninstalled and its counts reset in between:

``model:MODEL:CP:BACKEND[:grad]``: a tiny Flux or Wan (from config, seed 0) with ``enable_parallelism`` (``CP`` is
``ulysses`` or ``ring``, degree 2). It runs three times on the same inputs: the whole sequence in one process (the
single-process result), diffusers' own context parallelism (its ``native`` backend: Ulysses only; its ring needs a
log-sum-exp that no diffusers backend gives on a CPU, and the error it raises is reported), and the same parallel
model applied to ``BACKEND`` with attnpatch. Reported: max absolute differences, the backends that served the calls
attnpatch routed, its fallbacks and passthrough reasons. ``grad``: also the parameters' gradients of a weighted sum of
the output (summed over the ranks), against those of the single process and of diffusers' own parallel run.

``attention:CP:BACKEND[:grad][:mask][:nolse]``: ``dispatch_attention_fn`` called directly with a ``ParallelConfig``
(CP: ``ring``, ``ulysses``, ``ring_anything``, ``ulysses_anything``) on each rank's shard of q/k/v (B, S, H, D), with
``return_lse`` (not with ``nolse``), first unpatched (diffusers' own result, without return_lse, which its native
backend refuses) and then with attnpatch installed on ``BACKEND``. The gathered output and log-sum-exp are compared
with the whole-sequence float64 result and with diffusers' own. ``grad``: q/k/v require grad, and the gathered
gradients of a weighted sum are compared too. ``mask``: a key-padding mask (batch, seq_kv) on each rank's keys.

BACKEND may be one of two user backends registered here: ``user_plain`` (F.sdpa, declares no return_lse: ring
steps fall back) and ``user_lse`` (float64 math that declares return_lse: it serves ring steps itself).

Every rank leaves with ``os._exit`` after flushing: gloo's threads can abort the interpreter's own teardown (see
torchrun_probe.py).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

WORLD = 2


def main(cases: list[str]) -> list[dict[str, Any]]:
    import attnpatch
    from attnpatch.core import dispatch

    register_user_backends()
    results = []
    for case in cases:
        kind, *args = case.split(":")
        dispatch.reset_fallbacks()
        try:
            if kind == "model":
                result = run_model(*args[:3], grad="grad" in args)
            else:
                result = run_attention(
                    args[0], args[1], grad="grad" in args, mask="mask" in args, lse="nolse" not in args
                )
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        finally:
            attnpatch.uninstall()
        result["case"] = case
        result["fallbacks"] = sorted(
            f"{refusing} -> {serving}: {reason}" for (_, refusing, serving, reason) in dispatch.fallback_counts()
        )
        result["passthroughs"] = sorted({reason for (_, reason) in dispatch.passthrough_counts()})
        results.append(result)
    return results


def register_user_backends() -> None:
    import torch.nn.functional as F

    import attnpatch

    def plain(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):  # type: ignore[no-untyped-def]
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
        return out.transpose(1, 2)

    def with_lse(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, return_lse=False):  # type: ignore[no-untyped-def]
        dtype = q.dtype
        q, k, v = (x.transpose(1, 2).double() for x in (q, k, v))
        scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        lse = scores.logsumexp(-1)
        out = (torch.exp(scores - lse[..., None]).nan_to_num(0.0) @ v).transpose(1, 2).to(dtype)
        return (out, lse.transpose(1, 2).float()) if return_lse else out

    attnpatch.register_backend("user_plain", plain, replace=True, masks={"none", "key_padding", "bool", "additive"})
    attnpatch.register_backend("user_lse", with_lse, replace=True, return_lse=True, causal=False, dropout=False)


# --- tiny models ------------------------------------------------------------------------------------------------

FLUX = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 4, 8),
}
WAN = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}


def build(name: str) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    if name == "flux":
        return diffusers.FluxTransformer2DModel(**FLUX).eval()
    return diffusers.WanTransformer3DModel(**WAN).eval()


def inputs(name: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    if name == "flux":  # 32 image tokens, 8 text tokens: both split in two by Flux's _cp_plan
        return {
            "hidden_states": torch.randn(1, 32, 16, generator=g),
            "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g),
            "timestep": torch.tensor([1.0]),
            "img_ids": torch.rand(32, 3, generator=g),
            "txt_ids": torch.zeros(8, 3),
        }
    return {  # 2 frames x 4 x 4 patches = 32 tokens; the 6 text tokens stay whole (Wan's cross-attention)
        "hidden_states": torch.randn(1, 4, 2, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
        "timestep": torch.tensor([10]),
    }


def forward(model: torch.nn.Module, name: str, grad: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The output, and with ``grad`` the parameters' gradients of a fixed weighted sum of it (summed over the ranks
    of a parallel model: each rank's are those of its part of the sequence)."""
    # return_dict=False: diffusers' context-parallel hook on the model itself accepts only tensors or tuples.
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        out = model(**inputs(name), return_dict=False)[0]
        if not grad:
            return out, {}
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        (out * weight).sum().backward()
    grads = {}
    for param_name, param in model.named_parameters():
        if param.grad is not None:
            if getattr(model, "_parallel_config", None) is not None:
                dist.all_reduce(param.grad)
            grads[param_name] = param.grad
    return out.detach(), grads


@contextlib.contextmanager
def one_accelerator_for_the_cpu() -> Iterator[None]:
    # diffusers 0.42.1 ModelMixin._resolve_parallel_config picks the rank's device as
    # torch.device(device_type, rank % torch.accelerator.device_count()); a CPU-only torch counts 0 accelerators
    # (ZeroDivisionError). Counted as one while enable_parallelism runs, the device is cpu:0 on every rank.
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = original  # type: ignore[assignment]


def parallel(model: torch.nn.Module, cp: str) -> torch.nn.Module:
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ring_degree=WORLD) if cp == "ring" else ContextParallelConfig(ulysses_degree=WORLD)
    with one_accelerator_for_the_cpu():
        model.enable_parallelism(config=config)
    return model


def max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    return float((a.double() - b.double()).abs().max())


def run_model(name: str, cp: str, backend: str, grad: bool) -> dict[str, Any]:
    import attnpatch
    from attnpatch.core import hooks

    single, single_grads = forward(build(name), name, grad)
    model = parallel(build(name), cp)
    result: dict[str, Any] = {"model": name, "cp": cp, "backend": backend}
    try:
        diffusers_cp, diffusers_grads = forward(model, name, grad)
        result["diffusers_error"] = None
    except Exception as exc:  # diffusers' ring on a CPU: no backend of its gives the log-sum-exp
        diffusers_cp, diffusers_grads = None, {}
        result["diffusers_error"] = f"{type(exc).__name__}: {exc}"

    served: list[str] = []
    observer = lambda record: served.append(record.served)  # noqa: E731
    attnpatch.apply(model, backend)
    hooks.add_observer(observer)
    try:
        routed, routed_grads = forward(model, name, grad)
    finally:
        hooks.remove_observer(observer)
        attnpatch.unapply(model)
    result["routed_vs_single"] = max_diff(routed, single)
    result["diffusers_vs_single"] = max_diff(diffusers_cp, single)
    result["routed_vs_diffusers"] = max_diff(routed, diffusers_cp)
    if grad:
        assert routed_grads.keys() == single_grads.keys() and len(routed_grads) > 10, sorted(routed_grads)
        result["grads"] = len(routed_grads)
        result["grad_routed_vs_single"] = max(max_diff(routed_grads[n], single_grads[n]) or 0.0 for n in single_grads)
        result["grad_scale"] = max(float(g.abs().max()) for g in single_grads.values())
        if diffusers_grads:
            result["grad_diffusers_vs_single"] = max(
                max_diff(diffusers_grads[n], single_grads[n]) or 0.0 for n in single_grads
            )
            result["grad_routed_vs_diffusers"] = max(
                max_diff(routed_grads[n], diffusers_grads[n]) or 0.0 for n in diffusers_grads
            )
    result["served"] = sorted(set(served))
    result["calls"] = len(served)
    result["shape"] = list(routed.shape)
    return result


# --- one attention call -----------------------------------------------------------------------------------------


def parallel_config(cp: str) -> Any:
    from diffusers import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    # ring, ulysses, ring_anything, ulysses_anything (diffusers' variants for sequences and heads of any size).
    base = cp.removesuffix("_anything")
    options: dict[str, Any] = {f"{base}_degree": WORLD}
    if cp.endswith("_anything"):
        options[f"{base}_anything"] = True
    cp_config = ContextParallelConfig(**options)
    mesh = init_device_mesh("cpu", cp_config.mesh_shape, mesh_dim_names=cp_config.mesh_dim_names)
    config = ParallelConfig(context_parallel_config=cp_config)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    return config


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-sequence attention in float64: out (B, S, H, D) and the natural-log lse (B, S, H)."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = scores.logsumexp(-1)
    out = torch.softmax(scores, -1) @ v
    return out.transpose(1, 2), lse.transpose(1, 2)


def gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=1)


def run_attention(cp: str, backend: str, grad: bool, mask: bool, lse: bool) -> dict[str, Any]:
    from diffusers.models import attention_dispatch

    import attnpatch
    from attnpatch.core import hooks

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(2)
    batch, seq, heads, dim = 2, 24, 4, 16
    q, k, v = (torch.randn(batch, seq, heads, dim, generator=g) for _ in range(3))
    weight = torch.randn(batch, seq, heads, dim, generator=g)
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[1, 17:] = False  # the second sequence's last keys are padding, on rank 1's shard
    local = slice(rank * seq // WORLD, (rank + 1) * seq // WORLD)
    config = parallel_config(cp)
    result: dict[str, Any] = {}

    def call(return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        # This rank's shard in, the gathered output, lse and q/k/v gradients out.
        shards = [x[:, local].clone().requires_grad_(grad) for x in (q, k, v)]
        kwargs = {"attention_kwargs": {"return_lse": True}} if return_lse else {}
        with torch.set_grad_enabled(grad):
            got = attention_dispatch.dispatch_attention_fn(
                *shards, attn_mask=keep[:, local] if mask else None, parallel_config=config, **kwargs
            )
            out, lse_ = got if return_lse else (got, None)
            if grad:
                (out * weight[:, local]).sum().backward()
        grads = [gather(x.grad) for x in shards if x.grad is not None]
        return gather(out.detach()), None if lse_ is None else gather(lse_.detach()), grads

    expected_out, expected_lse = reference(q, k, v, keep if mask else None)
    expected_grads = []
    if grad:
        full = [x.double().requires_grad_(True) for x in (q, k, v)]
        (reference(*full, keep if mask else None)[0] * weight.double()).sum().backward()
        expected_grads = [x.grad for x in full]

    try:
        own_out, _, own_grads = call(return_lse=False)
        result["diffusers_error"] = None
        result["diffusers_out"] = max_diff(own_out, expected_out)
    except Exception as exc:  # diffusers' ring on a CPU: its native backend gives no log-sum-exp
        own_out, own_grads = None, []
        result["diffusers_error"] = f"{type(exc).__name__}: {exc}"

    served: list[str] = []
    observer = lambda record: served.append(record.served)  # noqa: E731
    attnpatch.install(backend)  # every dispatch_attention_fn call routed, the process default set to BACKEND
    hooks.add_observer(observer)
    try:
        out, lse_out, grads = call(return_lse=lse)
        result["routed_error"] = None
    except Exception as exc:  # a call passed through to diffusers fails as diffusers' own does
        result["routed_error"] = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        hooks.remove_observer(observer)
        result["served"] = sorted(set(served))
        result["calls"] = len(served)
    result["out"] = max_diff(out, expected_out)
    result["routed_vs_diffusers"] = max_diff(out, own_out)
    if lse_out is not None:
        result["lse"] = max_diff(lse_out, expected_lse)
        result["lse_dtype"] = str(lse_out.dtype)
        result["lse_shape"] = list(lse_out.shape)
    for name, mine, ref in zip("qkv"[: len(grads)], grads, expected_grads, strict=True):
        result[f"grad_{name}"] = max_diff(mine, ref)
    if own_grads:
        for name, mine, own in zip("qkv", grads, own_grads, strict=True):
            result[f"grad_{name}_vs_diffusers"] = max_diff(mine, own)
    return result


if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        line: Any = main(sys.argv[1:])
    except Exception as exc:  # never hang the other rank: every rank reaches the gather below
        line = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    lines: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    if dist.get_rank() == 0:
        print(json.dumps({"ranks": lines}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo's threads can abort the interpreter's own teardown (SIGABRT, about one run in five): leave without it.
    os._exit(0)
