"""The public patching API: apply / unapply a backend to models, or install routing process-wide.

``apply(pipe, backend="sage")`` marks every attention layer of a diffusers pipeline, a diffusers model, a
transformers model or any ``nn.Module`` containing them with the selection (``MODULE_ATTR``; ``apply(pipe)`` marks
them FOLLOW: routed, on whatever the ``attention_backend()`` block or the process default selects) and its
qualified name (``SITE_ATTR``), and installs the library patchers, which route the calls of marked layers to the
dispatcher. ``unapply`` removes the marks and, once no marked layer (a deepcopy's included), no process-wide
install and no open ``attention_backend()`` block is left, uninstalls the patchers, so the models compute exactly
what they did before. ``install`` routes every attention call of the process (models created later included) and
is what the runner and the startup hook call; ``attention_backend()`` routes the calls made inside its block.

The selection is per attention layer, never a process global: two models with different backends in one
process (and in different threads) keep their own (diffusers' own ``set_attention_backend`` flips a global:
diffusers issue #14249).
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import importlib
import importlib.util
import os
import sys
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from attnpatch import env
from attnpatch.core import forksafe, selection
from attnpatch.errors import AttnpatchError, AttnpatchWarning
from attnpatch.patchers import FOLLOW, KEEPER_ATTR, MODULE_ATTR, SITE_ATTR, Keeper, marks_alive, state

T = TypeVar("T")

# library -> patcher module; each is imported only when its library is installed.
PATCHERS = {"diffusers": "attnpatch.patchers.diffusers", "transformers": "attnpatch.patchers.transformers"}

ACCEPTED = (
    "a diffusers pipeline (DiffusionPipeline), a diffusers model (ModelMixin), a transformers model "
    "(PreTrainedModel) or a torch.nn.Module containing them"
)

_lock = forksafe.Lock(reentrant=True)
# Attention layers marked by apply / set_attention_backend (weak: a model that is dropped leaves by itself).
_marked: weakref.WeakSet[Any] = weakref.WeakSet()
_installed_patchers: list[ModuleType] = []
# Settings install() replaced, restored by uninstall(); None while no process-wide install is active.
_process_wide: dict[str, Any] | None = None
# attention_backend() blocks open now, in any thread: the patchers stay installed while one is.
_open_blocks = 0


@dataclass
class _Layer:
    site: str  # qualified name, component first: "transformer.transformer_blocks.0.attn"
    component: str  # "" for a bare model's own layers
    module: Any
    library: str


def apply(
    obj: T,
    backend: str | Mapping[str, str | None] | None = None,
    *,
    plan: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    steps: int | None = None,
) -> T:
    """Route the attention of ``obj`` to ``backend``, or as ``plan`` says; returns ``obj``.

    obj: a diffusers pipeline (every component in ``obj.components``), a diffusers or transformers model, or
        any ``torch.nn.Module`` containing them.
    backend: None (the default) routes every layer without a selection of its own: each call runs on what the
        :func:`attention_backend` block around it, or else the process default (``set_default_backend``, the
        runner, ATTNPATCH_BACKEND, then ``native``), selects at that moment. A selection (``"flash"``,
        ``"sage,flash,native"``, ``"auto"``) is the layers' own and wins over any block. Or a mapping from glob
        patterns to selections. Patterns match component names (``"transformer"``, ``"text_encoder*"``) and module paths
        (``"transformer.transformer_blocks.*.attn"``, ``"transformer.single_transformer_blocks"``); a key
        matching a module matches the attention layers inside it. Where several keys match a layer, the most
        specific wins (most non-wildcard characters), then the later key. ``None`` as a value leaves the
        matched layers unrouted. Layers that no key matches are left as they are.

    plan: an attention plan (docs/plans.md): the path of the JSON file ``python -m attnpatch tune`` wrote, or the
        plan as a dict. Its rules choose each layer's backend, per denoising step where a rule says ``steps``.
    steps: with a plan, the number of denoising steps, for rules counted from the end (``"-1:"``): needed for a
        bare model; a pipeline's own count (``num_timesteps``) is used otherwise.

    Everything is validated before anything changes: an unknown backend name, or a key that matches no
    attention layer, raises and leaves ``obj`` untouched. Applying twice re-marks, never wraps twice.
    """
    if plan is not None:
        if backend is not None:
            raise TypeError("apply() takes a backend or a plan, not both: a plan chooses each layer's backend itself")
        from attnpatch.api import plan_apply

        return plan_apply.apply_plan(obj, plan, steps)
    if steps is not None:
        raise TypeError("apply(steps=...) counts the steps of a plan: pass plan= too")
    roots = _roots(obj, "apply")
    _drop_plan(obj)
    selections = _validate_selection(backend)
    patchers = _available_patchers()
    layers = _find_layers(roots, patchers)
    chosen = _plan(layers, selections, roots)
    if not layers:
        warnings.warn(_nothing_found_message(obj, roots, patchers), AttnpatchWarning, stacklevel=2)
        return obj
    with _lock:
        _install_patchers(patchers)
        # Found again now that the patchers are installed: that also readies processor classes they had not
        # seen yet (a processor class defined outside diffusers).
        _find_layers(roots, patchers)
        for layer, spec in chosen:
            if spec is None:
                _unmark(layer.module)
            else:
                setattr(layer.module, MODULE_ATTR, spec)
                setattr(layer.module, SITE_ATTR, layer.site)
                setattr(layer.module, KEEPER_ATTR, Keeper())
                _marked.add(layer.module)
        _uninstall_if_unused()
    return obj


def unapply(obj: Any) -> Any:
    """Undo :func:`apply` on ``obj``; once nothing is routed any more, remove every patch. Returns ``obj``."""
    roots = _roots(obj, "unapply")
    _drop_plan(obj)
    with _lock:
        for _, root in roots:
            for module in root.modules():
                _unmark(module)
        _uninstall_if_unused()
    return obj


def set_attention_backend(module: Any, backend: str) -> None:
    """Per-model backend, as diffusers' ``ModelMixin.set_attention_backend`` but for this model only.

    module: a diffusers or transformers model (or any nn.Module containing one); backend: a selection string.
    """
    if not isinstance(backend, str):
        raise TypeError(
            f"set_attention_backend(module, backend): backend must be a string like 'flash' or 'sage,native', "
            f"got {type(backend).__name__}; use attnpatch.apply(obj, backend={{...}}) for a per-component mapping"
        )
    _require_module(module, "set_attention_backend")
    apply(module, backend)


def reset_attention_backend(module: Any) -> None:
    """Undo :func:`set_attention_backend` (the model runs its own attention code again)."""
    _require_module(module, "reset_attention_backend")
    unapply(module)


def install(backend: str | None = None, *, strict: bool | None = None, checks: bool | None = None) -> None:
    """Route every attention call of this process, including models created later.

    backend: process default selection (``None`` keeps the current default, ``native`` unless set); strict /
    checks: :func:`attnpatch.set_strict` / :func:`attnpatch.set_checks` when given. ``ATTNPATCH_DISABLE=1``
    makes this a no-op. Undo with :func:`uninstall`.
    """
    global _process_wide
    if env.disabled():
        return
    chain = selection.resolve(backend) if backend is not None else None
    patchers = _available_patchers()
    with _lock:
        if _process_wide is None:
            _process_wide = {
                "default": selection.get_default_backend(),
                "strict": selection.strict(),
                "checks": selection.checks(),
            }
        _install_patchers(patchers)
        state.route_all = True
        if chain is not None:
            selection.set_default_backend(chain.spec)
        if strict is not None:
            selection.set_strict(strict)
        if checks is not None:
            selection.set_checks(checks)


def uninstall() -> None:
    """Undo :func:`install`; models marked with :func:`apply` stay routed. Idempotent."""
    global _process_wide
    with _lock:
        saved, _process_wide = _process_wide, None
        state.route_all = False
        if saved is not None:
            selection.set_default_backend(saved["default"])
            selection.set_strict(saved["strict"])
            selection.set_checks(saved["checks"])
        _uninstall_if_unused()


class attention_backend(selection.attention_backend):  # noqa: N801 - used like a function, as in diffusers
    """Select a backend (or chain) for the attention calls made inside the block, in this thread only.

    The models called inside the block are routed whether or not anything applied them: the patchers are installed
    at the first block (as diffusers' own context manager needs nothing applied either) and stay installed while a
    block is open in any thread. A layer with a selection of its own (``apply(obj, backend="flash")``) keeps it; a
    layer applied without a backend follows the block. Nestable; also a decorator.
    """

    def __enter__(self) -> attention_backend:
        global _open_blocks
        if _compiling():  # inside a traced region: only the selection (patchers are installed eagerly, if at all)
            super().__enter__()
            return self
        with _lock:
            if not _installed_patchers and not env.disabled():
                _install_patchers(_available_patchers())
            _open_blocks += 1
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        global _open_blocks
        if _compiling():
            super().__exit__(*exc)
            return
        try:
            super().__exit__(*exc)
        finally:
            with _lock:
                _open_blocks -= 1


def _compiling() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.compiler.is_compiling())


def sdpa_redirect_paused() -> contextlib.AbstractContextManager[None]:
    """A block in which ``F.scaled_dot_product_attention`` is torch's own again (the SDPA redirect's wrapper is
    off in the whole process): benchmarks time unpatched code as it runs without attnpatch."""
    from attnpatch.patchers import sdpa

    return sdpa.paused()


def installed_patchers() -> list[str]:
    """Names of the libraries whose patchers are installed now (for the report and tests)."""
    return [p.__name__.rsplit(".", 1)[-1] for p in _installed_patchers]


def _drop_plan(obj: Any) -> None:
    # A plan applied to obj before: its step hooks would re-mark the layers that apply/unapply set now.
    plan_apply = sys.modules.get(f"{__name__}.plan_apply")
    if plan_apply is not None:
        plan_apply.remove(obj)


def components(obj: Any) -> list[tuple[str, Any]]:
    """(component name, nn.Module) pairs of a pipeline, or ``[("", obj)]`` for a model; raises TypeError else."""
    return _roots(obj, "apply")


def attention_layers(obj: Any) -> list[tuple[str, Any]]:
    """(qualified name, module) of every attention layer of ``obj`` that apply would mark, in model order."""
    return [(layer.site, layer.module) for layer in _find_layers(_roots(obj, "apply"), _available_patchers())]


def is_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a diffusers pipeline (without importing diffusers)."""
    return _is_pipeline(obj)


# --- finding things -------------------------------------------------------------------------------------------


def _roots(obj: Any, caller: str) -> list[tuple[str, Any]]:
    """(component name, module) pairs: a pipeline's nn.Module components, or ("", obj) for a module."""
    torch_nn = _torch_nn()
    if torch_nn is not None and isinstance(obj, torch_nn.Module):
        return [("", obj)]
    if _is_pipeline(obj):
        components = obj.components
        return [(name, c) for name, c in components.items() if torch_nn is not None and isinstance(c, torch_nn.Module)]
    raise TypeError(f"{caller}() takes {ACCEPTED}; got {_describe_type(obj)}")


def _require_module(module: Any, caller: str) -> None:
    torch_nn = _torch_nn()
    if torch_nn is None or not isinstance(module, torch_nn.Module):
        raise TypeError(
            f"{caller}() takes a diffusers model (ModelMixin), a transformers model (PreTrainedModel) or a "
            f"torch.nn.Module containing them; got {_describe_type(module)}"
            + ("; for a pipeline use attnpatch.apply(pipe, backend=...)" if _is_pipeline(module) else "")
        )


def _torch_nn() -> Any:
    import sys

    # Without torch imported, nothing passed to us can be an nn.Module; importing torch here would be wasted.
    torch = sys.modules.get("torch")
    return None if torch is None else torch.nn


def _is_pipeline(obj: Any) -> bool:
    import sys

    module = sys.modules.get("diffusers")
    pipeline_class = getattr(module, "DiffusionPipeline", None) if module is not None else None
    return pipeline_class is not None and isinstance(obj, pipeline_class)


def _describe_type(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}" if cls.__module__ != "builtins" else cls.__qualname__


def _available_patchers() -> list[ModuleType]:
    # A library that is not installed is skipped; a patcher module that is not there (yet) is skipped too.
    patchers = []
    for library, module_name in PATCHERS.items():
        if importlib.util.find_spec(library) is None:
            continue
        try:
            patchers.append(importlib.import_module(module_name))
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
    return patchers


def _find_layers(roots: list[tuple[str, Any]], patchers: list[ModuleType]) -> list[_Layer]:
    layers: list[_Layer] = []
    seen: set[int] = set()
    for component, root in roots:
        for patcher in patchers:
            library = patcher.__name__.rsplit(".", 1)[-1]
            for name, module in patcher.attention_modules(root):
                if id(module) in seen:
                    continue
                seen.add(id(module))
                site = ".".join(p for p in (component, name) if p)
                layers.append(_Layer(site or type(module).__name__, component, module, library))
    return layers


def _validate_selection(backend: Any) -> dict[str, str | None]:
    """{pattern: selection spec} (one "*" pattern for a plain selection); raises before anything changes."""
    if backend is None:
        return {"*": FOLLOW}
    if isinstance(backend, str):
        return {"*": selection.resolve(backend).spec}
    if isinstance(backend, Mapping):
        if not backend:
            raise ValueError("backend mapping is empty: give at least one 'pattern': 'backend' entry")
        selections: dict[str, str | None] = {}
        for pattern, value in backend.items():
            if not isinstance(pattern, str):
                raise TypeError(f"backend mapping keys are glob patterns (str), got {pattern!r}")
            if value is None:
                selections[pattern] = None
            elif isinstance(value, str):
                selections[pattern] = selection.resolve(value).spec
            else:
                raise TypeError(
                    f"backend mapping value for {pattern!r} must be a backend string or None, got {value!r}"
                )
        return selections
    raise TypeError(
        "backend must be a name or chain like 'flash' or 'sage,flash,native', or a mapping like "
        f"{{'transformer': 'sage', 'text_encoder*': 'native'}}; got {_describe_type(backend)}"
    )


def _plan(
    layers: list[_Layer], selections: dict[str, str | None], roots: list[tuple[str, Any]]
) -> list[tuple[_Layer, str | None]]:
    """The selection for each layer that a pattern matches; raises for a pattern that matches no layer."""
    # Most specific key first: the one with the most literal (non-wildcard) characters, then the later key.
    ranked = sorted(enumerate(selections), key=lambda item: (_literal_chars(item[1]), item[0]), reverse=True)
    used: set[str] = set()
    plan = []
    for layer in layers:
        paths = list(_prefixes(layer.site))
        matching = [p for _, p in ranked if any(fnmatch.fnmatchcase(path, p) for path in paths)]
        used.update(matching)
        if matching:
            plan.append((layer, selections[matching[0]]))
    unused = [p for p in selections if p not in used and p != "*"]
    if unused:
        raise AttnpatchError(_unmatched_message(unused, layers, roots))
    return plan


def _literal_chars(pattern: str) -> int:
    return sum(ch not in "*?[]" for ch in pattern)


def _prefixes(site: str) -> Iterator[str]:
    parts = site.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def _unmatched_message(unused: list[str], layers: list[_Layer], roots: list[tuple[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for layer in layers:
        top = layer.site.split(".", 1)[0] if not layer.component else layer.component
        counts[top] = counts.get(top, 0) + 1
    names = [name for name, _ in roots if name] or [n for root in roots for n, _ in root[1].named_children()]
    listing = ", ".join(f"{n} ({_count(counts.get(n, 0), 'attention layer')})" for n in names) or "none"
    keys = ", ".join(repr(p) for p in unused)
    return (
        f"backend mapping key {keys} matches no attention layer. Components: {listing}. Keys are glob patterns "
        "over component names and module paths, e.g. 'transformer', 'text_encoder*', "
        "'transformer.transformer_blocks.*.attn'"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _nothing_found_message(obj: Any, roots: list[tuple[str, Any]], patchers: list[ModuleType]) -> str:
    what = _describe_type(obj)
    if not patchers:
        why = "neither diffusers nor transformers is installed, so there is nothing attnpatch knows how to route"
    else:
        skipped: list[tuple[str, str]] = []
        for patcher in patchers:
            describe = getattr(patcher, "skipped_modules", None)
            for _, root in roots:
                skipped.extend(describe(root) if describe is not None else [])
        modules = [m for _, root in roots for m in root.modules()]
        libraries = {type(m).__module__.split(".", 1)[0] for m in modules} & set(PATCHERS)
        if skipped:
            classes = sorted({cls for _, cls in skipped})
            why = (
                f"its {len(skipped)} diffusers attention layers use processors that compute the attention "
                f"probabilities themselves ({', '.join(classes)}), which attnpatch leaves alone; "
                "model.set_attn_processor(AttnProcessor2_0()) makes them routable, e.g. "
                "pipe.unet.set_attn_processor(AttnProcessor2_0()) (set_default_attn_processor() installs AttnProcessor)"
            )
        elif libraries:
            why = f"it is a {'/'.join(sorted(libraries))} model, but none of its layers calls softmax attention "
            why += "in a way attnpatch recognises"
        else:
            why = "it is not, and contains no, diffusers or transformers model"
        reasons = [r for p in patchers for r in p.unsupported()]
        if reasons:
            why += "; also: " + "; ".join(reasons)
    return f"attnpatch.apply: 0 attention modules were found in {what}: {why}. Nothing was changed."


# --- installing -----------------------------------------------------------------------------------------------


def _install_patchers(patchers: list[ModuleType]) -> None:
    for patcher in patchers:
        patcher.install()
        if patcher not in _installed_patchers:
            _installed_patchers.append(patcher)


def _uninstall_if_unused() -> None:
    # With no marked layer and no process-wide routing, the wrappers would only cost time: take them out, so
    # the libraries run their own unmodified code again.
    if _process_wide is not None or state.route_all or _open_blocks or any(_is_marked(m) for m in list(_marked)):
        return
    # A deepcopy of an applied model (an EMA copy) is marked too, unseen by us: its Keepers are alive. So are those of
    # a dropped model caught in a reference cycle (torch.compile's caches make some): collect those first.
    if marks_alive():
        gc.collect()
        if marks_alive():
            return
    while _installed_patchers:
        _installed_patchers.pop().uninstall()


def _is_marked(module: Any) -> bool:
    return MODULE_ATTR in getattr(module, "__dict__", {})


def _unmark(module: Any) -> None:
    namespace = getattr(module, "__dict__", {})
    for attr in (MODULE_ATTR, SITE_ATTR, KEEPER_ATTR):
        if attr in namespace:
            delattr(module, attr)
    _marked.discard(module)


def unsupported() -> list[str]:
    """What the installed diffusers / transformers versions have that attnpatch cannot route (for the report)."""
    return [reason for patcher in _available_patchers() for reason in patcher.unsupported()]
