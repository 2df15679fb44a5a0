"""Applying a plan (:mod:`attnpatch.api.plans`): each layer's mark follows its rules, step by step.

``attnpatch.apply(obj, plan=..., steps=N)`` marks the layers that a rule matches (as ``apply`` marks them with a
mapping) and, when a rule is limited to steps, re-marks them as the steps go:

- A step is one forward call of the plan's root denoiser: a pipeline's ``unet``, ``transformer`` or
  ``transformer_2`` (Wan 2.2's second expert counts as the same denoiser), or the bare model applied. In a
  pipeline whose scheduler steps, the denoiser calls between two ``scheduler.step`` calls are one step (true CFG's
  conditional and unconditional passes, two experts), so steps are the pipeline's denoising steps.
- The count restarts at each pipeline ``__call__`` (the pipeline's class ``__call__`` is wrapped while a planned
  instance of it lives; other instances pass straight through) and, for a bare model, at apply.
- The number of steps, for negative bounds: ``steps=`` given to apply, else the pipeline's ``num_timesteps``
  (what it runs: an img2img ``strength`` included) read at the first denoiser call, else the call's
  ``num_inference_steps``. Layers that run before the first step (text encoders) are at step 0; after the last (the
  VAE) at the last step.
- At a step no rule of a layer holds, the layer follows the ``attention_backend()`` block or the process default.

The report names the rule that chose each call's backend (``core.hooks.set_selection_origin``). ``unapply`` takes
every hook, wrapper and mark back. Process-wide (``--plan``, ``ATTNPATCH_PLAN``): :func:`activate` applies the
plan to each pipeline or outermost model at its first forward call (a global forward pre-hook that, once a model is
seen, costs a set lookup per module call).
"""

from __future__ import annotations

import functools
import platform
import sys
import types
import weakref
from typing import Any

import torch

import attnpatch.api as api
from attnpatch.api import plans
from attnpatch.core import forksafe, hooks
from attnpatch.errors import AttnpatchError, shown
from attnpatch.patchers import FOLLOW, MODULE_ATTR

DENOISERS = ("transformer", "transformer_2", "unet")

_lock = forksafe.Lock(reentrant=True)


class _Tracker:
    """One applied plan: its layers' rules, the step count and the hooks that advance it."""

    def __init__(self, plan: plans.Plan, layers: list[tuple[str, Any, list[plans.Rule]]], total: int | None) -> None:
        self.plan = plan
        self.layers = layers  # (site, module, rules most specific first)
        self.given_total = total
        self.total = total
        self.step = 0
        self.started = False  # the denoiser ran since the count restarted
        self.stepped = False  # the scheduler stepped since the denoiser last ran
        self.counts_scheduler = False
        self.origins: dict[str, str] = {}
        self.handles: list[Any] = []
        self.scheduler: Any = None
        self.dynamic = any(rule.steps is not None for _, _, rules in layers for rule in rules)

    def restart(self, total: int | None = None) -> None:
        self.step, self.started, self.stepped = 0, False, False
        self.total = self.given_total or total
        self.mark()

    def mark(self) -> None:
        """Mark every layer with the selection of the rule that holds now (FOLLOW where none does)."""
        for site, module, rules in self.layers:
            rule = plans.choose(rules, self.step, self.total)
            namespace = module.__dict__
            spec = rule.backend if rule is not None else FOLLOW
            if namespace.get(MODULE_ATTR) != spec:
                setattr(module, MODULE_ATTR, spec)
            if rule is None:
                self.origins.pop(site, None)
            else:
                self.origins[site] = rule.label

    def before_denoiser(self, pipeline: Any) -> None:
        if not self.started:
            self.started = True
            if self.given_total is None and pipeline is not None:
                # What the pipeline runs (an img2img strength cuts the schedule), over num_inference_steps.
                self.total = _num_timesteps(pipeline) or self.total
        elif self.stepped or not self.counts_scheduler:
            self.step += 1
        self.stepped = False
        if self.dynamic:
            self.mark()


# applied root (pipeline or model) -> its tracker
_trackers: weakref.WeakKeyDictionary[Any, _Tracker] = weakref.WeakKeyDictionary()
# pipeline class -> (its own __call__ or None when inherited, our wrapper)
_wrapped_classes: dict[type, tuple[Any, Any]] = {}


def apply_plan(obj: Any, plan: Any, steps: int | None = None) -> Any:
    """``attnpatch.apply(obj, plan=..., steps=...)``: see the module docstring. Raises before changing anything."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise AttnpatchError(f"steps={shown(steps)} is not a positive integer: give the number of denoising steps")
    checked = plans.load(plan)
    plans.check_backends(checked)
    found = api.attention_layers(obj)
    layers = [(site, module, checked.rules_for(site)) for site, module in found]
    layers = [layer for layer in layers if layer[2]]
    if not layers:
        sites = ", ".join(sorted({site.split(".")[0] for site, _ in found})) or "none"
        raise plans.PlanError(
            f"plan {checked.name}: no rule matches an attention layer of {type(obj).__name__} (its layers "
            f"start with: {sites}). Rules match layer paths as the report names them: tune and apply the same "
            "object (a pipeline's paths start with its component, 'transformer.transformer_blocks.0.attn')"
        )
    pipeline = obj if api.is_pipeline(obj) else None
    if steps is None and pipeline is None and any(r.counts_from_end for _, _, rules in layers for r in rules):
        raise plans.PlanError(
            f"plan {checked.name}: a rule counts steps from the end, and {type(obj).__name__} is a bare "
            "model whose number of steps attnpatch cannot know: pass it, attnpatch.apply(model, plan=..., steps=N)"
        )
    plans.warn_if_elsewhere(checked, _device_of(obj))
    with _lock:
        remove(obj)
        api.apply(obj, {_escape(site): "native" for site, _, _ in layers})
        tracker = _Tracker(checked, layers, steps)
        _trackers[obj] = tracker
        tracker.restart()
        roots = [c for name, c in api.components(obj) if name in DENOISERS] if pipeline is not None else [obj]
        for root in roots:
            tracker.handles.append(root.register_forward_pre_hook(_denoiser_hook(obj)))
        if pipeline is not None:
            _hook_scheduler(tracker, pipeline)
            _wrap_class(type(pipeline))
        hooks.set_selection_origin(_origin)
    return obj


def remove(obj: Any) -> None:
    """Take back what :func:`apply_plan` added to ``obj`` (hooks, wrappers), not the marks (``unapply`` does)."""
    with _lock:
        tracker = _trackers.pop(obj, None)
        if tracker is None:
            return
        for handle in tracker.handles:
            handle.remove()
        _unhook_scheduler(tracker)
        cls = type(obj)
        if cls in _wrapped_classes and not any(type(o) is cls for o in list(_trackers)):
            _unwrap_class(cls)
        if not _trackers:
            _release_origin()


def applied(obj: Any) -> plans.Plan | None:
    """The plan applied to ``obj`` (a pipeline or model given to apply), if any."""
    tracker = _trackers.get(obj)
    return tracker.plan if tracker is not None else None


def current_step(obj: Any) -> tuple[int, int | None] | None:
    """(step, number of steps or None) of the plan applied to ``obj``; None without a plan."""
    tracker = _trackers.get(obj)
    return (tracker.step, tracker.total) if tracker is not None else None


def _origin(site: str) -> str | None:
    for tracker in list(_trackers.values()):
        label = tracker.origins.get(site)
        if label is not None:
            return label
    return None


def _release_origin() -> None:
    previous = hooks.set_selection_origin(None)
    if previous is not _origin:
        hooks.set_selection_origin(previous)  # someone else's: leave it


def _escape(site: str) -> str:
    # A layer path as a glob that matches only itself (paths hold no '*' or '?', but '[' is possible in principle).
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in site)


def _device_of(obj: Any) -> str | None:
    for _, component in api.components(obj):
        for parameter in component.parameters():
            device = parameter.device
            if device.type == "cuda":
                return str(torch.cuda.get_device_name(device))
            if device.type == "cpu":
                return f"cpu {platform.processor() or platform.machine()}"
            return device.type
    return None


def _num_timesteps(pipeline: Any) -> int | None:
    # Set by diffusers pipelines before their loop (after an img2img strength cut the schedule).
    try:
        value = pipeline.num_timesteps
    except Exception:
        return None
    return value if isinstance(value, int) and value > 0 else None


def _denoiser_hook(root: Any) -> Any:
    ref = weakref.ref(root)

    def hook(module: Any, args: Any) -> None:
        owner = ref()
        tracker = _trackers.get(owner) if owner is not None else None
        if tracker is not None and not torch.compiler.is_compiling():
            tracker.before_denoiser(owner if api.is_pipeline(owner) else None)

    return hook


# --- the pipeline's scheduler and __call__ -------------------------------------------------------------------------


def _hook_scheduler(tracker: _Tracker, pipeline: Any) -> None:
    """Wrap the pipeline's scheduler's ``step`` on the instance, so the tracker knows where a step ends."""
    scheduler = getattr(pipeline, "scheduler", None)
    if scheduler is tracker.scheduler:
        return
    _unhook_scheduler(tracker)
    step = getattr(scheduler, "step", None)
    if scheduler is None or not callable(step) or "step" in vars(scheduler):
        tracker.counts_scheduler = False
        return

    @functools.wraps(step)
    def counted_step(*args: Any, **kwargs: Any) -> Any:
        tracker.stepped = True
        return step(*args, **kwargs)

    counted_step.attnpatch_plan = True  # type: ignore[attr-defined]
    scheduler.step = counted_step
    tracker.scheduler = scheduler
    tracker.counts_scheduler = True


def _unhook_scheduler(tracker: _Tracker) -> None:
    scheduler, tracker.scheduler = tracker.scheduler, None
    if scheduler is not None and getattr(vars(scheduler).get("step"), "attnpatch_plan", False):
        del scheduler.step


def _wrap_class(cls: type) -> None:
    if cls in _wrapped_classes:
        return
    own = cls.__dict__.get("__call__")
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807 - it is the class's __call__
        tracker = _trackers.get(self)
        if tracker is not None:
            _hook_scheduler(tracker, self)  # pipe.scheduler may have been replaced since
            tracker.restart(_given_steps(kwargs))
        return original(self, *args, **kwargs)

    _wrapped_classes[cls] = (own, __call__)
    type.__setattr__(cls, "__call__", __call__)


def _unwrap_class(cls: type) -> None:
    own, wrapper = _wrapped_classes.pop(cls)
    if cls.__dict__.get("__call__") is not wrapper:
        return  # someone wrapped it after us: theirs stays, and ours passes through (no tracker)
    if own is None:
        type.__delattr__(cls, "__call__")
    else:
        type.__setattr__(cls, "__call__", own)


def _given_steps(kwargs: dict[str, Any]) -> int | None:
    value = kwargs.get("num_inference_steps")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- process-wide: --plan / ATTNPATCH_PLAN ----------------------------------------------------------------------------

_active: plans.Plan | None = None
_hook_handle: Any = None
_seen: weakref.WeakSet[Any] = weakref.WeakSet()
_failed: set[str] = set()


def activate(plan: Any) -> None:
    """Apply ``plan`` to every pipeline and outermost model of this process at its first forward call.

    The plan's structure is checked now (raises :class:`plans.PlanError`); its backends when it is applied, so a
    backend the script registers counts. A model it cannot be applied to runs without it, said in one line.
    """
    global _active, _hook_handle
    checked = plans.load(plan, resolve=False)
    with _lock:
        _active = checked
        if _hook_handle is None:
            _hook_handle = torch.nn.modules.module.register_module_forward_pre_hook(_first_call)


def deactivate() -> None:
    """Stop applying the process-wide plan to new models (models it was applied to keep it until unapplied)."""
    global _active, _hook_handle
    with _lock:
        handle, _hook_handle, _active = _hook_handle, None, None
        _seen.clear()
    if handle is not None:
        handle.remove()


def active() -> plans.Plan | None:
    return _active


def _first_call(module: Any, args: Any) -> None:
    if module in _seen or _active is None or torch.compiler.is_compiling():
        return
    with _lock:
        plan = _active
        if module in _seen or plan is None:
            return
        root = _pipeline_running(module) or module
        for _, component in api.components(root):
            _seen.update(component.modules())
        _seen.add(module)
        if root in _trackers or not api.attention_layers(root):
            return
        try:
            apply_plan(root, plan)
        except plans.PlanError as exc:
            if "no rule matches" in str(exc):
                return  # a model the plan is not about (a safety checker, a second model)
            _say_once(str(exc))
        except Exception as exc:  # the user's model call must go on: without the plan, said once
            _say_once(f"plan {plan.name} could not be applied ({type(exc).__name__}: {exc})")


def _say_once(message: str) -> None:
    if message in _failed:
        return
    _failed.add(message)
    if sys.stderr is not None:
        print(f"attnpatch: {message}; running without the plan", file=sys.stderr, flush=True)


def _pipeline_running(module: Any) -> Any:
    # The diffusers pipeline whose code called this module, if any (its `self` in a calling frame).
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if api.is_pipeline(owner):
                return owner
        frame = frame.f_back
    return None
