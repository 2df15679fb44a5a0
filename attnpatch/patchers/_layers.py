"""What every patcher reads from an attention layer: the chain its mark selects, and its qualified name.

``apply`` marks a layer with a selection (``MODULE_ATTR``) and its qualified name (``SITE_ATTR``). A layer that is
routed without apply (``install()``, the runner, ATTNPATCH_BACKEND, an ``attention_backend()`` block) carries
neither, yet the report and verify need the same name apply would give it
(``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1``). :func:`site_of` finds it at the layer's first
routed call, from the models whose code is running on this thread, and caches it on the layer.

A mark names a backend by string, so a model saved while applied and loaded in a process where that backend is
not registered carries a name nobody can resolve: :func:`chain_of` runs such a layer on ``native`` and says so
once, instead of raising in every call.
"""

from __future__ import annotations

import sys
import types
import warnings
import weakref
from typing import Any

import torch

from attnpatch.core import dispatch, forksafe, hooks, registry, selection
from attnpatch.core.selection import Chain
from attnpatch.errors import AttnpatchWarning, UnknownBackendError
from attnpatch.patchers import MODULE_ATTR, SITE_ATTR

# --- the selection of a mark -------------------------------------------------------------------------------------

# spec -> the native chain standing in for a mark whose backend is not registered (cleared when the registry changes).
_unknown: dict[str, Chain] = {}


def mark_of(module: Any) -> str | None:
    """The layer's mark (a selection, or FOLLOW), None when unmarked."""
    # The instance dict, not getattr: a missing attribute on an nn.Module goes through Module.__getattr__ and an
    # exception (~1 us), which every unmarked layer would pay on every call.
    namespace = getattr(module, "__dict__", None)
    return namespace.get(MODULE_ATTR) if namespace is not None else None


def chain_of(spec: str | None) -> Chain | None:
    """The chain a layer's mark selects; None for no mark or FOLLOW (the context or process default decides)."""
    if not spec:
        return None
    try:
        return selection.resolve(spec)
    except UnknownBackendError as exc:
        return _unregistered(spec, exc)


def _unregistered(spec: str, exc: UnknownBackendError) -> Chain:
    chain = _unknown.get(spec)
    if chain is None:
        chain = _unknown.setdefault(spec, selection.native_chain(spec))
        if chain is _unknown[spec] and not torch.compiler.is_compiling():
            warnings.warn(
                f"attnpatch: an attention layer is marked with backend {spec!r}, which this process does not know "
                f"({exc}). The model was probably applied, saved and loaded here: its layers run on 'native'. "
                "Register the backend before running the model, or attnpatch.apply(model, backend=...) it again.",
                AttnpatchWarning,
                stacklevel=4,
            )
    return chain


registry.on_change(_unknown.clear)


# mark (a selection, FOLLOW, or None for an unmarked layer) -> (the chain a call of the layer is routed with outside
# attention_backend() blocks, whether that chain runs torch's SDPA as it is: dispatch.runs_sdpa), until a setting,
# hook or backend changes. Read inline by the patchers' per-call code (patchers/sdpa.py, patchers/transformers.py);
# filled by route_of.
routes: dict[str | None, tuple[Chain, bool]] = {}
_routes_version = 0


def route_of(mark: str | None, compiling: bool = False) -> tuple[Chain, bool]:
    """The entry of :data:`routes` for ``mark``, made now; kept unless ``compiling`` (dynamo must not read or fill
    the cache: a traced read guards on what it holds then, so an eager call filling it later would recompile).

    A mark's chain; FOLLOW and unmarked layers get the process default, which the layer scope pushes so that the
    code inside knows the call is routed. Inside an attention_backend() block they take the block's chain instead,
    which is per thread and not cached here."""
    version = _routes_version
    chain = chain_of(mark) if mark else None
    if chain is None:
        chain = selection.default_chain()
    route = (chain, dispatch.runs_sdpa(chain))
    if version == _routes_version and not compiling:  # nothing changed meanwhile on another thread
        routes[mark] = route
    return route


def _routes_changed() -> None:
    global _routes_version
    _routes_version += 1
    routes.clear()


selection.on_change(_routes_changed, contexts=lambda: None)
hooks.on_change(_routes_changed)


# --- the name of a layer -----------------------------------------------------------------------------------------


def site_of(module: Any) -> str | None:
    """``module``'s qualified name: the one apply gave it, else found now (once) and cached on it.

    The name is what :func:`attnpatch.apply` would give the layer: component first when it runs inside a diffusers
    pipeline (``text_encoder.text_model.encoder.layers.0.self_attn``), else its path in the outermost model whose
    code is running (``model.layers.0.self_attn``). None while torch.compile traces: nothing that reads a site
    (the report, verify) runs in compiled code, and a traced read guards on each layer's own name, so a layer
    compiled on its own (after a graph break) would recompile once per layer.
    """
    namespace = getattr(module, "__dict__", None)
    # Dynamo is what guards on what a traced frame reads (is_dynamo_compiling: one Python call, is_compiling two).
    if namespace is None or torch.compiler.is_dynamo_compiling():
        return None
    site = namespace.get(SITE_ATTR)
    if site is None:
        site = _find_name(module, sys._getframe(1))
        setattr(module, SITE_ATTR, site)
    return site


_lock = forksafe.Lock()
# root (a model or a pipeline) -> {id(module): (weak reference to the module, qualified name)}, built once per root
_names: weakref.WeakKeyDictionary[Any, dict[int, tuple[weakref.ref[Any], str]]] = weakref.WeakKeyDictionary()
# Pipelines seen running: a component called on its own (pipe.unet(...)) is still named "unet...." as apply does.
_pipelines: weakref.WeakSet[Any] = weakref.WeakSet()


def _find_name(layer: Any, frame: types.FrameType | None) -> str:
    # The running methods' `self`s: every model and pipeline whose code led to this call. A pipeline comes first
    # (also one seen earlier that holds the outermost model: pipe.unet(...) called on its own), then the outermost
    # model that contains the layer (a harness module calling a model it does not own is passed over). The stack is
    # walked once per layer: the caller caches the name on it.
    models: list[Any] = []
    pipeline = None
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module):
                models.append(owner)
            elif _is_pipeline(owner):
                pipeline = owner
        frame = frame.f_back
    roots: list[Any] = []
    if pipeline is not None:
        _pipelines.add(pipeline)
        roots.append(pipeline)
    if models:
        outermost = models[-1]
        roots += [p for p in list(_pipelines) if p is not pipeline and any(m is outermost for _, m in _components(p))]
    for root in (*roots, *reversed(models)):
        name = _name_in(root, layer)
        if name is not None:
            return name
    return type(layer).__name__


def _name_in(root: Any, layer: Any) -> str | None:
    # Looked up in the root's map; a miss rebuilds the map once (the model may have changed since it was built).
    with _lock:
        names = _names.get(root)
        built = names is None
        if names is None:
            names = _names[root] = _map(root)
    entry = names.get(id(layer))
    if (entry is None or entry[0]() is not layer) and not built:
        with _lock:
            names = _names[root] = _map(root)
        entry = names.get(id(layer))
    return entry[1] if entry is not None and entry[0]() is layer else None


def _map(root: Any) -> dict[int, tuple[weakref.ref[Any], str]]:
    # The names apply gives: component first in a pipeline (the first component holding a module wins), a root
    # layer named by its class.
    parts = _components(root) if _is_pipeline(root) else [("", root)]
    names: dict[int, tuple[weakref.ref[Any], str]] = {}
    for component, model in parts:
        for path, module in model.named_modules():
            if id(module) not in names:
                site = ".".join(p for p in (component, path) if p) or type(module).__name__
                names[id(module)] = (weakref.ref(module), site)
    return names


def _components(pipeline: Any) -> list[tuple[str, Any]]:
    components = getattr(pipeline, "components", None)
    if not isinstance(components, dict):
        return []
    return [(name, c) for name, c in components.items() if isinstance(c, torch.nn.Module)]


def _is_pipeline(obj: Any) -> bool:
    diffusers = sys.modules.get("diffusers")
    pipeline_class = getattr(diffusers, "DiffusionPipeline", None) if diffusers is not None else None
    return pipeline_class is not None and isinstance(obj, pipeline_class)
