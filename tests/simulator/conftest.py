"""Simulator tier: numba_cuda kernels under ``NUMBA_ENABLE_CUDASIM=1``, in their own pytest process::

    NUMBA_ENABLE_CUDASIM=1 python3 -m pytest -m simulator tests/simulator

Numba reads the variable once, when it is first imported, so it cannot be switched on inside a
process that has already imported numba (the host tier's): without it every test here is skipped.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
SKIP_REASON = ("the simulator tier needs NUMBA_ENABLE_CUDASIM=1 set before numba is imported; run it in its own "
               "process: NUMBA_ENABLE_CUDASIM=1 python3 -m pytest -m simulator tests/simulator")


def _numba_device_arrays_are_arrays() -> None:
    """The simulator's device arrays (``FakeCUDAArray``) have no ``__cuda_array_interface__``, so
    ``sparsecore._arrays.kind_of`` does not know them unless it checks their class name (a
    one-line patch proposed for ``_arrays.py``). Until that lands, teach the three modules that
    imported ``kind_of`` the same thing, for this process only."""
    from numba import cuda

    from sparsecore import _arrays, _checks
    from sparsecore.ops import dispatcher

    fake = cuda.to_device([0.0])
    if _arrays.kind_of(fake) == "numba":
        return
    original = _arrays.kind_of

    def kind_of(x: object) -> str:
        k = original(x)
        if k == "other" and type(x).__name__ == "FakeCUDAArray":
            return "numba"
        return k

    for mod in (_arrays, _checks, dispatcher):
        mod.kind_of = kind_of  # type: ignore[attr-defined]


@pytest.fixture(scope="session", autouse=True)
def _simulator_session() -> Iterator[None]:
    if not SIM:
        yield
        return
    _numba_device_arrays_are_arrays()
    # The simulator runs each CUDA thread as a Python thread and every barrier hands the GIL around:
    # a short switch interval makes barriers about 3x cheaper.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)
