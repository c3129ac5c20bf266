"""Host tier: the selection cost model (sparsecore.ops.selection_cost): its arithmetic and choices."""

from __future__ import annotations

import pytest

from sparsecore.ops.selection_cost import HOST_CPU, Coefficients, choose_method, estimate_ms

SHAPE = dict(rows=90, head_dim=64, k=160)


def test_costs_grow_with_the_context_and_quest_reads_least() -> None:
    for method in ("exact", "int8", "quest"):
        costs = [estimate_ms(method, context=s, **SHAPE) for s in (1024, 4096, 16384)]
        assert costs == sorted(costs) and costs[0] > 0, method
    at = {m: estimate_ms(m, context=8192, **SHAPE) for m in ("exact", "int8", "quest")}
    assert at["quest"] < at["int8"] < at["exact"]


def test_the_model_is_bytes_over_bandwidth_plus_work() -> None:
    c = Coefficients(bandwidth=1e9, exact_ns=0.0, int8_ns=0.0, bound_ns=0.0, topk_ns=0.0, gather_ns=0.0, call_us=0.0)
    # 1 row, 1000 keys of 64 float32: 256 kB at 1 GB/s = 0.256 ms
    assert estimate_ms("exact", context=1000, rows=1, head_dim=64, k=10, coeffs=c) == pytest.approx(0.256)
    assert estimate_ms("int8", context=1000, rows=1, head_dim=64, k=10, coeffs=c) == pytest.approx(0.068)
    assert estimate_ms("quest", context=1024, rows=1, head_dim=64, k=10, coeffs=c) == pytest.approx(0.032768)


def test_choice_follows_the_costs() -> None:
    assert choose_method(context=8192, **SHAPE) == "int8"
    assert choose_method(context=8192, **SHAPE, allow_quest=True) == "quest"
    slow_memory_free = Coefficients(bandwidth=1e15, exact_ns=1.0, int8_ns=5.0, bound_ns=1.0, topk_ns=1.0,
                                    gather_ns=1.0, call_us=0.0)
    assert choose_method(context=8192, **SHAPE, coeffs=slow_memory_free) == "exact"  # int8 arithmetic costs more
    assert HOST_CPU.bandwidth > 0


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="estimate_ms: method = 'topp'; allowed: 'exact', 'int8', 'quest'"):
        estimate_ms("topp", context=1, **SHAPE)
    with pytest.raises(ValueError, match="estimate_ms: context = -1; must be an int >= 0"):
        estimate_ms("exact", context=-1, **SHAPE)


def test_host_cpu_choices_for_smollm2_shapes() -> None:
    """What docs/selection.md measured: one call per layer of 3 rows. Since the code update is one
    compiled pass (0.03 ms), int8 pays off from 2K on this host; at 1K the fixed cost per call hides
    it; with the old NumPy update (0.39 ms per layer) exact won up to 8K."""
    shape = dict(rows=3, head_dim=64)
    assert choose_method(context=1024, k=20, **shape) == "exact"
    assert choose_method(context=2048, k=40, **shape) == "int8"
    assert choose_method(context=8192, k=163, **shape) == "int8"
    numpy_update = Coefficients(**{**HOST_CPU.__dict__, "int8_update_us": 390.0, "int8_ns": 18.0, "exact_ns": 10.0})
    assert choose_method(context=8192, k=163, coeffs=numpy_update, **shape) == "exact"
