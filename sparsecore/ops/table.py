"""The op table: every op declared once, at its arguments' dataclass in :mod:`sparsecore.ops.inputs`
(the ``@op`` decorator of :mod:`sparsecore.ops.base`): its ``Inputs`` class, its meaning (the NumPy
reference, run on those arguments), what it returns and, for ops without hand-written ones, an
example call and a NumPy peer. The dispatcher's registry, the reference backend, ``python -m
sparsecore info``, ``warmup``, the benchmarks and the tests' parametrisation read this table; a new
op is an ``Inputs`` class with its ``@op`` row, a reference function, a public function and a
backend (``docs/op_flow.md`` walks one call through).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import inputs as _inputs  # noqa: F401 - declares every op (its @op rows)
from .base import DECLARED, OpInputs

__all__ = ["OpSpec", "TABLE", "OPS", "SPECS", "spec"]


@dataclass(frozen=True)
class OpSpec:
    """One op: ``name`` (the public function's), ``inputs`` (its arguments' dataclass), ``reference``
    (its meaning: the NumPy reference called on a validated ``inputs``), ``family`` (``"ffn"`` or
    ``"decode"``), ``returns`` (what it gives back, in words), and optionally ``example(rng, dtype)``
    (the ``inputs`` of a decode-size call), ``baseline(inputs)`` (``(name, call)``: its NumPy peer) and
    ``out_shape(inputs)`` (the shape of its one output: the torch custom op is made from the row)."""

    name: str
    inputs: type[OpInputs]
    reference: Callable[[Any], Any]
    family: str
    returns: str
    example: Callable[[np.random.Generator, str], OpInputs] | None = None
    baseline: Callable[[Any], tuple[str, Callable[[], Any]]] | None = None
    out_shape: Callable[[Any], tuple[Any, ...]] | None = None


TABLE: tuple[OpSpec, ...] = tuple(OpSpec(name, cls, **cls.ROW) for name, cls in DECLARED.items())

#: the op names, in table order
OPS: tuple[str, ...] = tuple(s.name for s in TABLE)
SPECS: dict[str, OpSpec] = {s.name: s for s in TABLE}

for _s in TABLE:
    if _s.family not in ("ffn", "decode"):
        raise RuntimeError(f"op table: {_s.name} has family {_s.family!r}; allowed: 'ffn', 'decode'")


def spec(name: str) -> OpSpec:
    """The table row of op ``name``."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"spec: op = {name!r} is unknown; ops: {', '.join(OPS)}") from None
