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


def _shared_arrays_once_per_block() -> None:
    """The simulator's ``cuda.shared.array`` (``FakeCUDAShared.array``) looks the call site up in a
    per-block dict and, when missing, creates ``np.empty(...)`` and stores it: a check-then-set that
    is not atomic across the Python threads that play the block's CUDA threads. When the GIL switches
    between the check and the set, two threads of one block get two different "shared" arrays, and a
    block scan reads uninitialised memory (seen in CI: a select_topk count of -4.6e18). Real shared
    memory has no such race, so make the allocation atomic, for this process only. The invariant is
    tested in ``test_simulator_harness.py``."""
    import threading

    from numba.cuda.simulator import kernelapi

    cls = kernelapi.FakeCUDAShared
    if getattr(cls.array, "_sparsecore_locked", False):
        return
    unlocked = cls.array
    lock = threading.Lock()
    # The simulator names a shared array by the source line that calls it; wrapping the original
    # would make that line this wrapper's for every array, so the wrapper names the caller itself
    # and holds the lock over the lookup and the store.
    def array(self, shape, dtype, alignment=None):  # noqa: ANN001, ANN202 - the simulator's signature
        if alignment is not None or shape == 0:
            return unlocked(self, shape, dtype, alignment)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                if isinstance(dtype, kernelapi.types.Type):
                    dtype = kernelapi.numpy_support.as_dtype(dtype)
                res = kernelapi.np.empty(shape, dtype)
                self._allocations[caller] = res
        return res

    array._sparsecore_locked = True  # type: ignore[attr-defined]
    cls.array = array


@pytest.fixture(scope="session", autouse=True)
def _simulator_session() -> Iterator[None]:
    if not SIM:
        yield
        return
    _numba_device_arrays_are_arrays()
    _shared_arrays_once_per_block()
    # The simulator runs each CUDA thread as a Python thread and every barrier hands the GIL around:
    # a short switch interval makes barriers about 3x cheaper.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)
