"""One dispatcher for every op (the pattern of xformers' fmha dispatch).

- Each op has an ``Inputs`` dataclass (:class:`OpInputs`) whose ``validate()`` rejects what no
  backend could take.
- Each backend defines one :class:`BackendOp` subclass per op (tuning variants are further
  subclasses with their own ``NAME``); capabilities are class attributes and
  ``not_supported_reasons()`` says in words why a class cannot take a call.
- :func:`dispatch` walks the classes in :data:`BACKEND_PRIORITY` order and takes the first with no
  reasons. ``backend="name"`` (a backend or a variant name) or ``SPARSECORE_BACKEND`` forces one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, ClassVar

from .._arrays import device_of, from_numpy, is_array, kind_of, to_numpy
from .._checks import check_same_place, fail

#: fastest first; the reference is the fallback that is always there.
BACKEND_PRIORITY: tuple[str, ...] = ("cupy", "cuda_python", "numba_cuda", "numba_cpu", "reference")

#: backend sub-packages imported (and so registered) on first dispatch.
BACKEND_MODULES: tuple[str, ...] = ("sparsecore.backends.reference", "sparsecore.backends.numba_cpu",
                                     "sparsecore.backends.numba_cuda", "sparsecore.backends.cupy",
                                     "sparsecore.backends.cuda_python")

OPS: tuple[str, ...] = ("pack", "unpack", "spmm", "sddmm", "spmm_t", "gated_ffn", "page_bounds", "select_topk",
                        "sparse_decode", "dense_decode", "merge_attention")

_REGISTRY: dict[str, list[type[BackendOp]]] = {op: [] for op in OPS}
_loaded = False


def _is_format(x: Any) -> bool:
    return hasattr(x, "map_arrays") and hasattr(x, "arrays")


def map_arrays(fn: Callable[[Any], Any], obj: Any) -> Any:
    """Apply ``fn`` to every array inside ``obj`` (an array, a format, a tuple of those, or other)."""
    if is_array(obj):
        return fn(obj)
    if _is_format(obj):
        return obj.map_arrays(fn)
    if isinstance(obj, tuple):
        return tuple(map_arrays(fn, o) for o in obj)
    return obj


@dataclasses.dataclass(frozen=True, eq=False)
class OpInputs:
    """Base of every op's arguments. Subclasses set ``OP`` and implement ``_validate``."""

    OP: ClassVar[str] = ""

    @functools.cached_property
    def _arrays(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if is_array(v):
                out[f.name] = v
            elif _is_format(v):
                out.update({f"{f.name}.{n}": a for n, a in v.arrays().items()})
        return out

    def named_arrays(self) -> dict[str, Any]:
        """Every array buffer of the call by a readable name (``a.values``, ``kv.lengths``)."""
        return self._arrays

    def map_arrays(self, fn: Callable[[Any], Any]) -> OpInputs:
        changes = {f.name: map_arrays(fn, getattr(self, f.name)) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **changes)

    @functools.cached_property
    def device(self) -> str:
        arrs = self.named_arrays()
        return device_of(next(iter(arrs.values()))) if arrs else "host"

    @functools.cached_property
    def kind(self) -> str:
        arrs = self.named_arrays()
        return kind_of(next(iter(arrs.values()))) if arrs else "numpy"

    @property
    def dtype(self) -> str:
        """The value dtype of the call (what backends' ``DTYPES`` are checked against)."""
        raise NotImplementedError

    def validate(self) -> None:
        """Shapes, dtypes, devices and arguments: cheap, reads no data."""
        check_same_place(self.OP, self.named_arrays())
        self._validate()

    def _validate(self) -> None:
        raise NotImplementedError

    def validate_data(self) -> None:
        """Invariants that need the data (index ranges, uniqueness). Runs on host inputs by default;
        for device inputs (it syncs and copies) only with ``SPARSECORE_VALIDATE=always``."""

    def check_bounds(self) -> None:
        """The cheap part of :meth:`validate_data` that keeps a host kernel inside its buffers (index
        and page ranges by a min/max pass; no sort, no uniqueness). Runs on host inputs whenever
        :meth:`validate_data` does not, so ``SPARSECORE_VALIDATE=never`` cannot crash the process.
        Default: ``check_bounds(op, name)`` of every format argument that has one."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if _is_format(v) and hasattr(v, "check_bounds"):
                v.check_bounds(self.OP, f.name)


class BackendOp:
    """One backend's implementation of one op. Capabilities are class attributes."""

    OP: ClassVar[str] = ""
    NAME: ClassVar[str] = ""  # unique per op: the backend name, or backend name + variant
    BACKEND: ClassVar[str] = ""
    DEVICE: ClassVar[str] = "host"  # "host" or "cuda"
    DTYPES: ClassVar[tuple[str, ...]] = ("float32", "float16", "bfloat16")
    VERSION: ClassVar[str] = ""

    @classmethod
    def availability_reasons(cls) -> list[str]:
        """Why this class cannot run at all here (library missing, no GPU); empty if it can."""
        return []

    @classmethod
    def input_reasons(cls, inp: Any) -> list[str]:
        """Op-specific limits (max head_dim, tile, ...). Override in backends."""
        return []

    @classmethod
    def not_supported_reasons(cls, inp: Any) -> list[str]:
        reasons = cls.availability_reasons()
        if reasons:
            return reasons
        if inp.device != cls.DEVICE:
            reasons.append(f"runs on {cls.DEVICE} arrays, the inputs are on {inp.device}")
        if inp.dtype not in cls.DTYPES:
            reasons.append(f"dtype {inp.dtype} is not supported (supported: {', '.join(cls.DTYPES)})")
        return reasons + cls.input_reasons(inp)

    @classmethod
    def supports(cls, inp: Any) -> bool:
        return not cls.not_supported_reasons(inp)

    @classmethod
    def run(cls, inp: Any) -> Any:
        """Compute on arrays the backend understands (NumPy for host backends)."""
        raise NotImplementedError

    @classmethod
    def apply(cls, inp: Any) -> Any:
        """Run the op on ``inp`` and return arrays of the kind the caller gave."""
        if cls.DEVICE == "host":
            kind = inp.kind
            if kind == "numpy" and all(k == "numpy" for k in map(kind_of, inp.named_arrays().values())):
                return cls.run(inp)  # nothing to convert either way (a decode step's overhead matters)
            out = cls.run(inp.map_arrays(to_numpy))
            return map_arrays(lambda a: from_numpy(a, kind), out)
        return cls.run(inp)


def register(cls: type[BackendOp]) -> type[BackendOp]:
    """Class decorator: add a backend op class to the registry of its op."""
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


def _deep_validation(inp: OpInputs) -> bool:
    mode = os.environ.get("SPARSECORE_VALIDATE", "auto")
    if mode not in ("auto", "always", "never"):
        fail("SPARSECORE_VALIDATE", f"value {mode!r} is not allowed; use 'auto', 'always' or 'never'")
    return mode == "always" or (mode == "auto" and inp.device == "host")


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
    """Validate ``inp``, pick a backend op class and run it."""
    inp.validate()
    check_no_grad(inp)
    cls = select(inp, backend)
    if _deep_validation(inp):
        inp.validate_data()
    elif inp.device == "host":
        inp.check_bounds()
    return cls.apply(inp)
