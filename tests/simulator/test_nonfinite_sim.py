"""The non-finite contract (docs/ops.md) on numba_cuda under the simulator: NaN and infinities in q,
K and V of dense and sparse decode (24 tokens: two splits of 16 keys and the split merge) and in the
partials of merge_attention; the oracle is tests/nonfinite.py's float64 loop code."""

from __future__ import annotations

import pytest

import sparsecore as sc
from tests._util import assert_close
from tests.nonfinite import POISONS, decode_case, indices_for, merge_case, oracle_decode, oracle_merge

from ._cases import dev
from .conftest import SIM, SKIP_REASON

# The simulator runs a kernel's float32 arithmetic as NumPy scalars, which warn on inf - inf and
# 0 * inf where a GPU just computes IEEE NaN: here those NaN are the point, so the warnings are ignored.
pytestmark = [pytest.mark.simulator, pytest.mark.skipif(not SIM, reason=SKIP_REASON),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def _check(got, want, dtype: str, what: str) -> None:
    assert_close(got[0], want[0], dtype, what=f"{what} out")
    assert_close(got[1], want[1], "float32" if dtype == "float32" else dtype, what=f"{what} lse")


@pytest.mark.parametrize("poison", list(POISONS))
def test_decode_follows_the_nonfinite_contract(poison: str) -> None:
    dtype = "bfloat16" if poison in ("nan-key", "all-neg-inf-nan-value") else "float32"
    q, kv = decode_case(poison, dtype, paged=poison in ("nan-query", "inf-value", "mixed"))
    _check(sc.dense_decode(dev(q), dev(kv)), oracle_decode(q, kv, None, None), dtype, f"{poison} dense_decode")
    for groups, ps in ((kv.num_kv_heads, None), (q.shape[1], 4)):
        index = indices_for(kv, groups=groups, page_size=ps, keep=0.7, seed=groups)
        _check(sc.sparse_decode(dev(q), dev(kv), dev(index), scale=0.7), oracle_decode(q, kv, index, 0.7), dtype,
               f"{poison} sparse_decode G={groups} page_size={ps}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_attention_follows_the_nonfinite_contract(dtype: str) -> None:
    o1, l1, o2, l2 = merge_case(dtype)
    want = oracle_merge(o1, l1, o2, l2)
    got = sc.merge_attention(dev(o1), dev(l1), dev(o2), dev(l2))
    assert_close(got[0], want[0], dtype, what="merge out")
    assert_close(got[1], want[1], "float32", what="merge lse")
