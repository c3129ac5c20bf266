"""The simulator harness itself: every CUDA thread of a block must see the same ``cuda.shared.array``.
The simulator's allocation is a check-then-set over a dict, run by the Python threads that play the
block's CUDA threads; the conftest makes it atomic. The test widens the window between the check and
the set (a ``numpy.empty`` that sleeps, so the GIL goes to another thread there, as it can anywhere):
the simulator as shipped then hands threads of one block different arrays."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from numba import cuda  # a module global: the simulator swaps it for its fake module while a kernel runs

from .conftest import SIM, SKIP_REASON

pytestmark = [pytest.mark.simulator, pytest.mark.skipif(not SIM, reason=SKIP_REASON)]

N = 16


@cuda.jit
def _reverse_through_shared(out):
    buf = cuda.shared.array(N, np.int64)
    t = cuda.threadIdx.x
    buf[t] = t + 1
    cuda.syncthreads()
    out[cuda.blockIdx.x, t] = buf[N - 1 - t]


def test_shared_array_is_one_array_per_block(monkeypatch: pytest.MonkeyPatch) -> None:
    from numba.cuda.simulator import kernelapi

    def slow_empty(*args: object, **kwargs: object) -> np.ndarray:
        time.sleep(1e-3)
        return np.empty(*args, **kwargs)

    monkeypatch.setattr(kernelapi, "np", SimpleNamespace(**{**vars(np), "empty": slow_empty}))
    out = np.zeros((2, N), np.int64)
    _reverse_through_shared[2, N](out)
    np.testing.assert_array_equal(out, np.broadcast_to(N - np.arange(N), (2, N)))
