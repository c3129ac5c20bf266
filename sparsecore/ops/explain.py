"""``sc.explain(op, *args, **kwargs)``: which backend a call would run on, and why every other would not.

The call is not run: its arguments are bound as the public op binds them, validated, and every
registered implementation (backends and tuning variants, in priority order) is asked for its reasons
(:meth:`BackendOp.not_supported_reasons`), the same the dispatcher asks. The arrays are described in one
line each (the formats' ``repr``).

float64 inputs run on the NumPy reference only (it accumulates in float64 and is far slower than the
compiled backends). :class:`SlowPathWarning` (a :class:`SparsecoreWarning`) is the category a caller
can filter; :func:`warn_if_slow` warns once per (op, dtype) when a call lands on the reference although
a compiled backend is available for another dtype. The dispatcher does not call it yet (its one-line
hook belongs in ``sparsecore.ops.dispatcher.plan``, where a new signature is planned, so it costs
nothing per call); ``explain`` always reports it.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

__all__ = ["explain", "Explanation", "SparsecoreWarning", "SlowPathWarning", "warn_if_slow"]


class SparsecoreWarning(UserWarning):
    """Base category of sparsecore's warnings (``warnings.filterwarnings("ignore", category=...)``)."""


class SlowPathWarning(SparsecoreWarning):
    """A call runs on the NumPy reference (e.g. float64 inputs) although a compiled backend is here."""


_WARNED: set[tuple[str, str]] = set()


def slow_path_note(inp: Any, backend: type) -> str | None:
    """Why ``backend`` (chosen for ``inp``) is the slow path, or None when it is not."""
    if getattr(backend, "BACKEND", "") != "reference":
        return None
    from .dispatcher import implementations

    fast = [c.NAME for c in implementations(inp.OP) if c.BACKEND != "reference" and not c.availability_reasons()
            and c.DEVICE == inp.device]
    if not fast:
        return None
    return (f"{inp.OP}: {inp.dtype} inputs run on the NumPy reference (float64 accumulation, much slower); "
            f"the compiled backends ({', '.join(fast)}) take {', '.join(_dtypes(inp.OP, fast))}: cast the inputs "
            "to float32 (or pass backend='reference' to silence this)")


def _dtypes(op: str, names: list[str]) -> list[str]:
    from .dispatcher import implementations

    out: list[str] = []
    for c in implementations(op):
        if c.NAME in names:
            out += [d for d in c.DTYPES if d not in out]
    return out


def warn_if_slow(inp: Any, backend: type, *, forced: bool = False, stacklevel: int = 3) -> None:
    """Warn once per (op, dtype) with :class:`SlowPathWarning` when ``backend`` is the slow reference
    and the caller did not ask for it (``forced``)."""
    if forced or (inp.OP, inp.dtype) in _WARNED:
        return
    note = slow_path_note(inp, backend)
    if note:
        _WARNED.add((inp.OP, inp.dtype))
        warnings.warn(note, SlowPathWarning, stacklevel=stacklevel)


def _describe(v: Any) -> str:
    from .._arrays import dtype_name, is_array
    from ..formats._summary import place, shape_text

    if is_array(v):
        return f"{shape_text(v.shape)} {dtype_name(v)}, {place(v)}"
    return repr(v)


@dataclass
class Explanation:
    """What :func:`explain` found. ``str()`` (and ``repr()``) is the readable report."""

    op: str
    arguments: dict[str, str]
    backend: str | None  # the implementation that would run; None when none can
    reasons: dict[str, list[str]] = field(default_factory=dict)  # implementation -> why not ([] = could run)
    forced: str | None = None
    error: str | None = None  # the validation error, when the call itself is invalid
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        from .dispatcher import BACKEND_PRIORITY

        lines = [f"sparsecore.explain: {self.op}(" + ", ".join(self.arguments) + ")"]
        lines += [f"  {k} = {v}" for k, v in self.arguments.items()]
        if self.error:
            lines.append(f"  invalid call, no backend is asked: {self.error}")
            return "\n".join(lines)
        how = (f"forced by {self.forced}" if self.forced
               else f"the first that can, in priority {' > '.join(BACKEND_PRIORITY)}")
        lines.append(f"  runs on: {self.backend or 'nothing (NotImplementedError)'} ({how})")
        width = max((len(n) for n in self.reasons), default=0) + 2
        for name, rs in self.reasons.items():
            if name == self.backend:
                state = "<- runs"
            elif not rs:
                state = "could run; a higher-priority implementation is chosen" if not self.forced else \
                    "could run; not the one forced"
            else:
                state = "no: " + "; ".join(rs)
            lines.append(f"    {name:<{width}}{state}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def explain(op: str, *args: Any, **kwargs: Any) -> Explanation:
    """Which implementation ``sparsecore.<op>(*args, **kwargs)`` would run and why every other would not,
    without running it. ``backend=`` (and ``SPARSECORE_BACKEND``) are honoured as the op honours them::

        >>> print(sc.explain("spmm", a, w))            # doctest: +SKIP
        sparsecore.explain: spmm(a, w)
          ...
          runs on: numba_cpu (the first that can, in priority cupy > cuda_python > numba_cuda > numba_cpu > reference)
    """
    from .. import ops
    from .dispatcher import implementations, select
    from .table import OPS, spec

    if op not in OPS:
        raise ValueError(f"explain: op = {op!r} is unknown; allowed: {', '.join(OPS)}")
    fn = getattr(ops, op)
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"explain: the arguments do not fit {op}{inspect.signature(fn)}: {e}") from None
    bound.apply_defaults()
    call = dict(bound.arguments)
    backend = call.pop("backend", None)
    described = {k: _describe(v) for k, v in call.items()}
    forced_name = backend if backend is not None else (os.environ.get("SPARSECORE_BACKEND") or None)
    forced = None
    if forced_name is not None:
        forced = f"backend={forced_name!r}" if backend is not None else f"SPARSECORE_BACKEND={forced_name!r}"
    inp = spec(op).inputs(**call)
    try:
        inp.validate()
    except (ValueError, TypeError) as e:
        return Explanation(op, described, None, forced=forced, error=str(e))
    reasons = {c.NAME: c.not_supported_reasons(inp) for c in implementations(op)}
    notes: list[str] = []
    try:
        chosen: str | None = select(inp, backend).NAME
    except (ValueError, NotImplementedError) as e:
        chosen = None
        notes.append(str(e).splitlines()[0])
    if chosen is not None:
        cls = next(c for c in implementations(op) if c.NAME == chosen)
        note = None if forced else slow_path_note(inp, cls)
        if note:
            notes.append(note)
        if cls.BACKEND == "numba_cpu":
            from ..warmup import cache_dir

            notes.append(f"numba_cpu compiles each kernel on its first use with new argument types (seconds) "
                         f"and caches it in {cache_dir()}; `python3 -m sparsecore warmup` compiles ahead of time")
    return Explanation(op, described, chosen, reasons, forced, None, notes)
