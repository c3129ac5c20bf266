"""The NumPy reference as a backend: always available, host arrays, every value dtype, float64
accumulation. Last in priority: the fallback and the oracle. One class per row of the op table
(:mod:`sparsecore.ops.table`), whose ``reference`` is the op's meaning."""

from __future__ import annotations

from typing import Any, ClassVar

from ...ops.base import BackendOp
from ...ops.dispatcher import register
from ...ops.table import TABLE, OpSpec


class _Reference(BackendOp):
    NAME: ClassVar[str] = "reference"
    BACKEND: ClassVar[str] = "reference"
    DEVICE: ClassVar[str] = "host"
    DTYPES: ClassVar[tuple[str, ...]] = ("float64", "float32", "float16", "bfloat16")


def _make(s: OpSpec) -> type[BackendOp]:
    def run(cls: type[BackendOp], inp: Any) -> Any:
        return s.reference(inp)

    name = "".join(part.capitalize() for part in s.name.split("_"))
    return type(f"Reference{name}", (_Reference,), {"OP": s.name, "run": classmethod(run), "__module__": __name__})


CLASSES = [register(_make(s)) for s in TABLE]
globals().update({c.__name__: c for c in CLASSES})

__all__ = [c.__name__ for c in CLASSES]
