"""quantize_keys' device path (torch CUDA tensors, CuPy arrays): the same float64 arithmetic in the
array library's operations. Run here on CPU torch tensors through the same function
(``_quantize_on_device``), bit for bit against the host conversion: a fresh copy, a decode step's
update (one gather and scatter) and a general update from ``start``, dense and paged, on exact ties,
zeros, tiny and huge keys, NaN and infinities."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sparsecore as sc  # noqa: E402
from sparsecore.formats import codes as C  # noqa: E402


def _keys(dtype: torch.dtype) -> torch.Tensor:
    rng = np.random.default_rng(5)
    k = rng.standard_normal((3, 40, 2, 16)).astype(np.float32) * 3
    k[0, 1] = 0.0
    k[0, 2, 0, :] = np.arange(16) - 7.5  # codes near halves of a step
    k[0, 3, 1, :] = np.arange(16) - 7.5
    k[0, 3, 1, 0] = 127.0  # scale 1: k / scale are exact ties, rounded to even
    k[1, 4, 0, 3] = np.nan
    k[1, 5, 1, 0] = -np.inf
    k[2, 6] = 1e-38
    k[2, 7] = 3e38 if dtype != torch.float16 else 6e4
    return torch.from_numpy(k).to(dtype)


def _cache(k: torch.Tensor, lengths: torch.Tensor, paged: bool) -> sc.DenseKV | sc.PagedKV:
    if not paged:
        return sc.DenseKV(k, k, lengths)
    b, s, h, d = k.shape
    ps = 8
    n = b * s // ps
    table = torch.from_numpy(np.random.default_rng(1).permutation(n).astype(np.int32)).reshape(b, s // ps)
    pages = torch.zeros(n, ps, h, d, dtype=k.dtype)
    for i in range(b):
        for j in range(s // ps):
            pages[table[i, j]] = k[i, j * ps:(j + 1) * ps]
    return sc.PagedKV(pages, pages, table, lengths)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.numpy(), b.numpy()
    if a.dtype == np.float32:  # NaN bits too
        a, b = a.view(np.int32), b.view(np.int32)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_device_path_has_the_host_bits(dtype: torch.dtype, paged: bool) -> None:
    lengths = torch.tensor([40, 33, 12], dtype=torch.int32)
    kv = _cache(_keys(dtype), lengths, paged)
    host = sc.quantize_keys(kv)
    fresh = C._quantize_on_device("quantize_keys", kv, None, None, "torch")
    for b, n in enumerate(lengths.tolist()):
        _same(fresh.codes[b, :n], host.codes[b, :n])
        _same(fresh.scales[b, :n], host.scales[b, :n])
    for start in ([39, 32, 11], [39, 33, 12], [10, 0, 12]):  # a decode step, nothing new, a general update
        stale = sc.KeyCodes(torch.full_like(host.codes, 9), torch.full_like(host.scales, -2.0))
        st = torch.tensor(start, dtype=torch.int32)
        again = C._quantize_on_device("quantize_keys", kv, stale, st, "torch")
        assert again is stale
        for b, n in enumerate(lengths.tolist()):
            _same(stale.codes[b, start[b]:n], host.codes[b, start[b]:n])
            _same(stale.scales[b, start[b]:n], host.scales[b, start[b]:n])
            assert (stale.codes[b, :start[b]] == 9).all() and (stale.codes[b, n:] == 9).all()  # untouched


def test_device_path_checks_out_and_start() -> None:
    kv = _cache(_keys(torch.float32), torch.tensor([40, 33, 12], dtype=torch.int32), False)
    with pytest.raises(ValueError, match=r"quantize_keys: start = \[41, 0, 0\]; expected 3 ints with 0 <= start"):
        C._quantize_on_device("quantize_keys", kv, sc.quantize_keys(kv), torch.tensor([41, 0, 0]), "torch")
    numpy_codes = sc.quantize_keys(sc.DenseKV(kv.k.numpy(), kv.v.numpy(), kv.lengths.numpy()))
    with pytest.raises(ValueError, match="quantize_keys: out holds numpy arrays but kv holds torch arrays"):
        C._quantize_on_device("quantize_keys", kv, numpy_codes, None, "torch")


def test_other_torch_devices_are_refused() -> None:
    k = torch.zeros(1, 4, 1, 8, device="meta")
    with pytest.raises(ValueError, match="quantize_keys: kv holds torch tensors on meta; quantize_keys converts "
                                         "NumPy arrays, torch tensors on the CPU or a CUDA device, and CuPy arrays"):
        sc.quantize_keys(sc.DenseKV(k, k, torch.full((1,), 4, dtype=torch.int32, device="meta")))
