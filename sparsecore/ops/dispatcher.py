"""One dispatcher for every op (the pattern of xformers' fmha dispatch).

- Each op has an ``Inputs`` dataclass (:class:`OpInputs`) whose ``validate()`` rejects what no
  backend could take.
- Each backend defines one :class:`BackendOp` subclass per op (tuning variants are further
  subclasses with their own ``NAME``); capabilities are class attributes and
  ``not_supported_reasons()`` says in words why a class cannot take a call.
- :func:`dispatch` walks the classes in :data:`BACKEND_PRIORITY` order and takes the first with no
  reasons. ``backend="name"`` (a backend or a variant name) or ``SPARSECORE_BACKEND`` forces one.
- What validation and selection decide depends only on the call's *signature*: each array's
  library, device, dtype and shape, each format's class and metadata, and the scalar arguments
  (:meth:`OpInputs.signature`). :func:`plan` memoises it per signature as a :class:`Plan` (the
  backend class and the normalised scalar arguments), so a call that repeats a signature, a decode
  step, a layer of the same shape, skips both and only checks the data (when that is on) and runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Any

from .._checks import fail
from .base import BackendOp, OpInputs, map_arrays, signature
from .table import OPS, TABLE, OpSpec

#: fastest first; the reference is the fallback that is always there.
BACKEND_PRIORITY: tuple[str, ...] = ("cupy", "cuda_python", "numba_cuda", "numba_cpu", "reference")

#: backend sub-packages imported (and so registered) on first dispatch.
BACKEND_MODULES: tuple[str, ...] = ("sparsecore.backends.reference", "sparsecore.backends.numba_cpu",
                                     "sparsecore.backends.numba_cuda", "sparsecore.backends.cupy",
                                     "sparsecore.backends.cuda_python")

__all__ = ["BACKEND_PRIORITY", "OPS", "TABLE", "OpSpec", "OpInputs", "BackendOp", "Plan", "register",
           "implementations", "select", "plan", "dispatch", "map_arrays", "signature", "load_backends"]

_REGISTRY: dict[str, list[type[BackendOp]]] = {op: [] for op in OPS}
_loaded = False


def register(cls: type[BackendOp]) -> type[BackendOp]:
    """Class decorator: add a backend op class to the registry of its op."""
    _PLANS.clear()
    if cls.OP not in _REGISTRY:
        raise ValueError(f"register: {cls.__name__}.OP = {cls.OP!r} is not an op; ops: {', '.join(OPS)}")
    if cls.BACKEND not in BACKEND_PRIORITY:
        raise ValueError(f"register: {cls.__name__}.BACKEND = {cls.BACKEND!r} is not in BACKEND_PRIORITY")
    if any(c.NAME == cls.NAME for c in _REGISTRY[cls.OP]):
        raise ValueError(f"register: {cls.OP} already has an implementation named {cls.NAME!r}")
    _REGISTRY[cls.OP].append(cls)
    return cls


def load_backends() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in BACKEND_MODULES:
            importlib.import_module(mod)  # a backend imports without its library and says why it can't run


def implementations(op: str) -> list[type[BackendOp]]:
    """Every registered class of ``op``, in priority order."""
    load_backends()
    if op not in _REGISTRY:
        raise ValueError(f"implementations: op = {op!r} is unknown; ops: {', '.join(OPS)}")
    return sorted(_REGISTRY[op], key=lambda c: BACKEND_PRIORITY.index(c.BACKEND))


def _format_reasons(classes: list[type[BackendOp]], inp: OpInputs) -> str:
    lines = []
    for c in classes:
        rs = c.not_supported_reasons(inp)
        lines.append(f"  {c.NAME}: " + ("; ".join(rs) if rs else "supported"))
    return "\n".join(lines)


def select(inp: OpInputs, backend: str | None = None) -> type[BackendOp]:
    """The class that will run ``inp``: the forced one, or the first in priority with no reasons."""
    op = inp.OP
    classes = implementations(op)
    name = backend if backend is not None else (os.environ.get("SPARSECORE_BACKEND") or None)
    if name is not None:
        source = "backend" if backend is not None else "SPARSECORE_BACKEND"
        forced = [c for c in classes if name in (c.NAME, c.BACKEND)]
        if not forced:
            known = sorted({c.NAME for c in classes} | {c.BACKEND for c in classes})
            fail(op, f"{source} = {name!r} is unknown for this op; known: {', '.join(known)}")
        for c in forced:
            if c.supports(inp):
                return c
        fail(op, f"{source} = {name!r} cannot run this call:\n{_format_reasons(forced, inp)}")
    for c in classes:
        if c.supports(inp):
            return c
    raise NotImplementedError(f"{op}: no backend can run this call "
                              f"(device {inp.device}, dtype {inp.dtype}):\n{_format_reasons(classes, inp)}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a call's signature decides, once: the backend class that runs it and the normalised
    scalar arguments (defaults filled in, types made plain)."""

    backend: type[BackendOp]
    scalars: tuple[tuple[str, Any], ...]
    device: str
    registry: list[type[BackendOp]]  # the op's registry list it was chosen from (replaced by tests: then stale)
    registered: int
    #: host calls on NumPy arrays: None before the signature's first run, then the backend's
    #: ``runner`` (made on the second: the first runs ``apply``, so a compile is named by its op) or
    #: False when it has none
    runner: list[Any] = dataclasses.field(default_factory=lambda: [None], compare=False)

    def host_runner(self, inp: OpInputs) -> Any:
        """The backend's runner for this signature's NumPy calls, or None (then ``apply``)."""
        slot = self.runner
        r = slot[0]
        if r is None:  # first call: run apply (a compile names its op), make the runner next time
            slot[0] = _MAKE
            return None
        if r is _MAKE:
            r = slot[0] = self.backend.runner(inp) or False
        return r or None


_MAKE = object()

#: signature -> Plan; emptied when a backend class is registered, and when it grows past PLAN_CACHE_SIZE
_PLANS: dict[Any, Plan] = {}
PLAN_CACHE_SIZE = 4096


def plan(inp: OpInputs, backend: str | None = None) -> Plan:
    """Validate ``inp`` and pick its backend, or reuse what an earlier call with the same signature
    (and the same forced backend) decided; on reuse the normalised scalar arguments are put back
    into ``inp``."""
    name = backend if backend is not None else (os.environ.get("SPARSECORE_BACKEND") or None)
    try:
        key = (inp.signature(), name)
        found = _PLANS.get(key)
    except TypeError:  # an unhashable argument: validate and select every time
        key, found = None, None
    if found is not None and found.registry is _REGISTRY[inp.OP] and found.registered == len(found.registry):
        inp.__dict__.update(found.scalars)  # the normalised scalars (fields of a frozen dataclass)
        return found
    inp.validate()
    chosen = select(inp, backend)
    from .explain import warn_if_slow

    warn_if_slow(inp, chosen, forced=name is not None)  # float64 on the reference: said once per op and dtype
    made = Plan(chosen, tuple(inp.scalars().items()), inp.device, _REGISTRY[inp.OP],
                len(_REGISTRY[inp.OP]))
    if key is not None:
        if len(_PLANS) >= PLAN_CACHE_SIZE:
            _PLANS.clear()
        _PLANS[key] = made
    return made


def _deep_validation(device: str) -> bool:
    mode = os.environ.get("SPARSECORE_VALIDATE", "auto")
    if mode not in ("auto", "always", "never"):
        fail("SPARSECORE_VALIDATE", f"value {mode!r} is not allowed; use 'auto', 'always' or 'never'")
    return mode == "always" or (mode == "auto" and device == "host")


#: ops whose torch custom op in :mod:`sparsecore.torch` has a registered gradient.
DIFFERENTIABLE_OPS: tuple[str, ...] = ("pack", "unpack", "spmm", "sddmm", "spmm_t", "gated_ffn")


def check_no_grad(inp: OpInputs) -> None:
    """Refuse torch tensors that require grad while grad mode is on: the public ops do not record
    gradients, so their result would silently have none. torch is looked up in ``sys.modules``,
    never imported (a call on torch tensors has imported it already). Inside the custom ops of
    :mod:`sparsecore.torch` grad mode is off, so they pass."""
    if inp.kind != "torch":
        return
    torch = sys.modules.get("torch")
    if torch is None or not torch.is_grad_enabled():
        return
    for name, a in inp.named_arrays().items():
        if getattr(a, "requires_grad", False):
            op = inp.OP
            if op in DIFFERENTIABLE_OPS:
                fix = (f"use sparsecore.torch.{op}, which is differentiable, or call it under torch.no_grad() "
                       "if no gradient is wanted")
            else:
                fix = f"{op} has no gradient; call it under torch.no_grad() or pass detached tensors"
            fail(op, f"{name} requires grad, but sparsecore.{op} does not record gradients (the result would "
                     f"silently have none); {fix}")


def dispatch(inp: OpInputs, backend: str | None = None) -> Any:
    """Validate ``inp`` (or reuse the plan of its signature), refuse a torch tensor whose gradient
    would be lost, check the data (or at least the bounds of host inputs), and run the backend."""
    p = plan(inp, backend)
    check_no_grad(inp)
    if _deep_validation(p.device):
        inp.validate_data()
    elif p.device == "host":
        inp.check_bounds()
    if p.device == "host" and inp.all_numpy:
        run = p.host_runner(inp)
        if run is not None:
            return run(inp)
    return p.backend.apply(inp)
