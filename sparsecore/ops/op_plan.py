"""Plan once, run many, for any op of the table: what :class:`DecodePlan` does for a decode step.

A public call decides everything from its arguments' signature (validation, the backend, the
kernel variant) and then checks the data; at decode sizes those decisions cost more than the
kernel. ``OpPlan`` makes them once, from example arguments::

    plan = sc.OpPlan("spmm", a, w)       # validates, picks the backend, binds the kernel
    for step in steps:
        out = plan.run(a_step, w)        # == sc.spmm(a_step, w)

``run`` takes the op's array and format arguments, in the public function's order (the scalar
arguments are the plan's). A run whose arguments have the plan's metadata (each buffer's shape,
dtype and strides; each format's class and sizes) goes straight to the backend's launcher: no
validation of the unchanged metadata, no backend choice, no conversion; the bounds of host formats
are still checked, by one compiled pass or by the launcher's kernel itself before it reads through
an index (``spmm``'s row kernel), which keeps a kernel inside its buffers. A run with other
metadata is checked in full, as a public call, and becomes the plan's metadata. Data validation
(``SPARSECORE_VALIDATE=auto`` checks every invariant of host formats on public calls) is skipped by
runs; with ``SPARSECORE_VALIDATE=always`` when the plan is made, every run is a public call.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._arrays import is_array
from .._checks import fail
from .base import _all_numpy_format, _is_format, signature
from .dispatcher import _deep_validation, check_no_grad, dispatch, plan
from .table import spec

__all__ = ["OpPlan"]


def _metadata(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Shapes, dtypes and strides of NumPy arguments, signatures of formats of NumPy buffers;
    None when any argument is of another kind (such runs are public calls)."""
    out: list[Any] = []
    for a in args:
        if type(a) is np.ndarray:
            out.append((a.shape, a.dtype, a.strides))
        elif _is_format(a):
            if not _all_numpy_format(a):
                return None
            out.append(signature(a))
        else:
            return None
    return tuple(out)


class OpPlan:
    """One op planned for arguments like the examples given (see the module docstring)::

        plan = sc.OpPlan(op, *args, backend=None, **scalars)   # op: a name of sparsecore.ops.OPS
        result = plan.run(*args)                               # == getattr(sc, op)(*args, **scalars)

    ``args`` are the op's array and format arguments in its public function's order (``spmm``:
    ``a, w``; ``gated_ffn``: ``x, gate, w_up, w_down``; ``pack``: ``x``); ``scalars`` its other
    keyword arguments (``pack``'s ``threshold``, ``tile``, ...). A plan holds no buffers of its
    own: each run returns new outputs.
    """

    def __init__(self, op: str, *args: Any, backend: str | None = None, **scalars: Any) -> None:
        s = spec(op)
        fields = [n for n in s.inputs.__dataclass_fields__ if n != "OP"]
        given = dict(zip(fields, args))
        if len(args) > len(fields):
            fail("OpPlan", f"{op} takes at most {len(fields)} arguments ({', '.join(fields)}), got {len(args)}",
                 TypeError)
        for n in scalars:
            if n not in fields:
                fail("OpPlan", f"{op} has no argument {n!r}; arguments: {', '.join(fields)}", TypeError)
            if n in given:
                fail("OpPlan", f"{op}: argument {n!r} given twice", TypeError)
        self.op = op
        self._spec = s
        self._names = tuple(n for n, v in given.items() if type(v) is np.ndarray or _is_format(v)
                            or is_array(v))
        if tuple(fields[:len(self._names)]) != self._names:
            fail("OpPlan", f"{op}: give the array and format arguments ({', '.join(self._names)}) "
                           "positionally and the others by keyword", TypeError)
        self._scalars = {**{n: v for n, v in given.items() if n not in self._names}, **scalars}
        self._backend = backend
        inp = s.inputs(*args, **scalars)
        self._plan = plan(inp, backend)
        check_no_grad(inp)  # the planning call's data is checked as a public call's would be
        if _deep_validation(self._plan.device):
            inp.validate_data()
        elif self._plan.device == "host":
            inp.check_bounds()
        self._bind(inp)

    def _bind(self, inp: Any) -> None:
        fast = self._plan.device == "host" and inp.all_numpy and os.environ.get("SPARSECORE_VALIDATE") != "always"
        self._launch = self._plan.backend.launcher(inp) if fast else None
        # a launcher whose kernel checks every index before reading through it needs no bounds pass
        self._launch_checks = bool(getattr(self._launch, "checks_bounds", False))
        self._formats = tuple(i for i, n in enumerate(self._names) if _is_format(getattr(inp, n)))
        self._seen = _metadata(tuple(getattr(inp, n) for n in self._names)) if fast else None

    @property
    def backend(self) -> str:
        """The backend (or variant) name that runs the plan."""
        return self._plan.backend.NAME

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._scalars.items())
        return f"OpPlan({self.op}({', '.join(self._names)}{', ' if opts else ''}{opts}); backend {self.backend})"

    def run(self, *args: Any) -> Any:
        """The op on ``args`` (the plan's array and format arguments, in order)."""
        if len(args) != len(self._names):
            fail(f"OpPlan({self.op}).run", f"takes {len(self._names)} arguments ({', '.join(self._names)}), "
                                           f"got {len(args)}", TypeError)
        if self._launch is not None:
            seen = _metadata(args)
            if seen is not None and seen == self._seen:
                if not self._launch_checks:
                    for i in self._formats:  # one compiled pass each: what keeps the kernel in bounds
                        args[i].check_bounds(self.op, self._names[i])
                return self._launch(*args)
        inp = self._spec.inputs(**dict(zip(self._names, args)), **self._scalars)
        result = dispatch(inp, self._backend)  # checked in full, as a public call
        if self._launch is not None and inp.all_numpy:
            p = plan(inp, self._backend)
            if p is not self._plan:
                self._plan = p
                self._bind(inp)
            else:
                self._seen = _metadata(args)
        return result
