"""The two base classes every op is made of (see :mod:`sparsecore.ops.dispatcher`): an op's
arguments (:class:`OpInputs`, one dataclass per op in :mod:`sparsecore.ops.inputs`) and one backend's
implementation of one op (:class:`BackendOp`), and the call signature that plans are memoised by."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from .._arrays import device_of, dtype_name, from_numpy, is_array, kind_of, to_numpy
from .._checks import _device_label, check_same_place

__all__ = ["OpInputs", "BackendOp", "signature", "map_arrays", "op", "DECLARED"]


_IS_FORMAT: dict[type, bool] = {}


def _is_format(x: Any) -> bool:
    """A sparsecore format (or anything with ``map_arrays`` and ``arrays``), memoised per type."""
    t = type(x)
    f = _IS_FORMAT.get(t)
    if f is None:
        f = _IS_FORMAT[t] = hasattr(x, "map_arrays") and hasattr(x, "arrays")
    return f


def _buffers(fmt: Any) -> dict[str, Any]:
    """``fmt.arrays()``, kept on the format: a format is a frozen dataclass, so its buffers (the
    array objects, not their data) never change after construction."""
    d = fmt.__dict__.get("_sc_buffers") if hasattr(fmt, "__dict__") else None
    if d is None:
        d = fmt.arrays()
        if hasattr(fmt, "__dict__"):
            object.__setattr__(fmt, "_sc_buffers", d)
    return d


def _all_numpy_format(fmt: Any) -> bool:
    f = fmt.__dict__.get("_sc_numpy") if hasattr(fmt, "__dict__") else None
    if f is None:
        f = all(type(a) is np.ndarray for a in _buffers(fmt).values())
        if hasattr(fmt, "__dict__"):
            object.__setattr__(fmt, "_sc_numpy", f)
    return f


def map_arrays(fn: Callable[[Any], Any], obj: Any) -> Any:
    """Apply ``fn`` to every array inside ``obj`` (an array, a format, a tuple of those, or other)."""
    if is_array(obj):
        return fn(obj)
    if _is_format(obj):
        return obj.map_arrays(fn)
    if isinstance(obj, tuple):
        return tuple(map_arrays(fn, o) for o in obj)
    return obj


_FIELDS: dict[type, tuple[str, ...]] = {}
_PLAIN = frozenset({int, float, str, bool, type(None), tuple})


def _field_names(t: type) -> tuple[str, ...]:
    names = _FIELDS.get(t)
    if names is None:
        names = _FIELDS[t] = tuple(f.name for f in dataclasses.fields(t))
    return names


def signature(v: Any) -> Any:
    """What validation may read of ``v``: an array's library, device, dtype and shape (and, for a
    NumPy array, whether it is writeable); a format's class and the signature of each field; any
    other value itself (it must be hashable)."""
    t = type(v)
    if t is np.ndarray:
        return (v.dtype, v.shape, v.flags.writeable)
    if t in _PLAIN:
        return v
    if is_array(v):
        return (type(v), dtype_name(v), tuple(v.shape), _device_label(v))
    if _is_format(v):
        sig = v.__dict__.get("_sc_signature") if hasattr(v, "__dict__") else None
        if sig is None:
            sig = (type(v),) + tuple(signature(getattr(v, n)) for n in _field_names(type(v)))
            if hasattr(v, "__dict__"):  # kept on the format: frozen, its buffers' shapes and dtypes are fixed
                object.__setattr__(v, "_sc_signature", sig)
        return sig
    return v


class _cached:  # noqa: N801 - used as a decorator, like functools.cached_property
    """``functools.cached_property`` without the lock Python 3.11's version takes on every first
    access (an op's inputs live for one call on one thread; every public call reads three or four of
    these once): the value goes into the instance's ``__dict__``, which later reads find first."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


@dataclasses.dataclass(frozen=True, eq=False)
class OpInputs:
    """Base of every op's arguments. Subclasses set ``OP`` and implement ``_validate``."""

    OP: ClassVar[str] = ""

    @_cached
    def _arrays(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n in _field_names(type(self)):
            v = getattr(self, n)
            if v is None or isinstance(v, (int, float, str)):
                continue
            if is_array(v):
                out[n] = v
            elif _is_format(v):
                for name, a in _buffers(v).items():
                    out[f"{n}.{name}"] = a
        return out

    def _first_array(self) -> Any:
        for n in _field_names(type(self)):
            v = getattr(self, n)
            if type(v) is np.ndarray or is_array(v):
                return v
            if _is_format(v):
                bufs = _buffers(v)
                if bufs:
                    return next(iter(bufs.values()))
        return None

    @_cached
    def all_numpy(self) -> bool:
        """True when every buffer of the call is a NumPy array (nothing to convert for a host backend)."""
        for n in _field_names(type(self)):
            v = getattr(self, n)
            t = type(v)
            if t is np.ndarray or t in _PLAIN:
                continue
            if _is_format(v):
                if not _all_numpy_format(v):
                    return False
            elif is_array(v):
                return False
        return True

    def named_arrays(self) -> dict[str, Any]:
        """Every array buffer of the call by a readable name (``a.values``, ``kv.lengths``)."""
        return self._arrays

    def map_arrays(self, fn: Callable[[Any], Any]) -> OpInputs:
        changes = {n: map_arrays(fn, getattr(self, n)) for n in _field_names(type(self))}
        return dataclasses.replace(self, **changes)

    @_cached
    def device(self) -> str:
        a = self._first_array()
        return "host" if a is None else device_of(a)

    @_cached
    def kind(self) -> str:
        a = self._first_array()
        return "numpy" if a is None else kind_of(a)

    @property
    def dtype(self) -> str:
        """The value dtype of the call (what backends' ``DTYPES`` are checked against)."""
        raise NotImplementedError

    def signature(self) -> tuple[Any, ...]:
        """Everything :meth:`validate` and backend selection read (see :func:`signature`)."""
        d = self.__dict__
        sig: list[Any] = [type(self)]
        for n in _field_names(type(self)):
            v = d[n]
            t = type(v)
            if t in _PLAIN:  # the common cases first, without a call (a public call's overhead matters)
                sig.append(v)
            elif t is np.ndarray:
                sig.append((v.dtype, v.shape, v.flags.writeable))
            else:
                sig.append(signature(v))
        return tuple(sig)

    def scalars(self) -> dict[str, Any]:
        """The arguments that are neither arrays nor formats (as :meth:`validate` normalised them)."""
        return {n: v for n in _field_names(type(self))
                if not is_array(v := getattr(self, n)) and not _is_format(v)}

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
        for n in _field_names(type(self)):
            v = getattr(self, n)
            if _is_format(v) and hasattr(v, "check_bounds"):
                v.check_bounds(self.OP, n)


#: the annotation of an ``Inputs`` field that is an output buffer the op writes (optional), e.g.
#: threshold_mlp's ``kept``: a tensor argument its torch custom op declares as mutated
Out = Any


#: every op's ``Inputs`` class, by op name, in declaration order: the rows of the op table
DECLARED: dict[str, type[OpInputs]] = {}


def op(reference: Callable[[Any], Any], family: str, returns: str, *,
       example: Callable[[np.random.Generator, str], OpInputs] | None = None,
       baseline: Callable[[Any], tuple[str, Callable[[], Any]]] | None = None,
       out_shape: Callable[[Any], tuple[Any, ...]] | None = None) -> Callable[[type], type]:
    """Class decorator that declares an op at its arguments' dataclass: its row of the op table
    (:mod:`sparsecore.ops.table`). ``reference``: the op's meaning, the NumPy reference called on a
    validated instance; ``family``: ``"ffn"`` or ``"decode"``; ``returns``: what it gives back, in
    words. Optional, for ops whose warm-up and benchmark are not written by hand:
    ``example(rng, dtype)``, an instance for a decode-size call (what ``warmup`` compiles and the
    ``ops`` benchmark times), and ``baseline(inputs)``, ``(name, call)`` of the NumPy peer the
    benchmark times beside it. For an op of arrays and plain scalars that returns one array of its
    value dtype: ``out_shape(inputs)``, that array's shape from the inputs' shapes, from which
    :mod:`sparsecore.torch` makes its custom op (the fake implementation builds it)."""

    def declare(cls: type) -> type:
        cls.ROW = {"reference": reference, "family": family, "returns": returns, "example": example,
                   "baseline": baseline, "out_shape": out_shape}
        DECLARED[cls.OP] = cls
        return cls

    return declare


class BackendOp:
    """One backend's implementation of one op. Capabilities are class attributes."""

    OP: ClassVar[str] = ""
    NAME: ClassVar[str] = ""  # unique per op: the backend name, or backend name + variant
    BACKEND: ClassVar[str] = ""
    DEVICE: ClassVar[str] = "host"  # "host" or "cuda"
    DTYPES: ClassVar[tuple[str, ...]] = ("float32", "float16", "bfloat16")

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
    def launcher(cls, inp: Any) -> Any:
        """For plans (:class:`~sparsecore.DecodePlan`, :class:`~sparsecore.OpPlan`) of host backends:
        a callable bound to ``inp``'s shapes that later calls of the same metadata run without
        validation or dispatch (each op documents its arguments), or None when this backend or
        call has none (the plan then runs the public path)."""
        return None

    @classmethod
    def runner(cls, inp: Any) -> Any:
        """For host backends: ``run(inp2) -> result`` for later public calls of ``inp``'s signature
        on NumPy arrays (same shapes, dtypes and scalars; the dispatcher keeps it on the signature's
        plan), with every shape decision made once. It returns new outputs on every call and holds
        no workspace, so threads may share it. None (the default): such calls run :meth:`apply`.
        Its decisions are the backend's as they stand when it is made: code that changes a backend's
        tuning constants later (a test patching numba_cpu's ``PARALLEL_MIN_WORK``) clears the plans
        (``sparsecore.ops.dispatcher._PLANS.clear()``)."""
        return None

    @classmethod
    def apply(cls, inp: Any) -> Any:
        """Run the op on ``inp`` and return arrays of the kind the caller gave."""
        if cls.DEVICE == "host":
            if inp.all_numpy:
                return cls.run(inp)  # nothing to convert either way (a decode step's overhead matters)
            kind = inp.kind
            out = cls.run(inp.map_arrays(to_numpy))
            return map_arrays(lambda a: from_numpy(a, kind), out)
        return cls.run(inp)
