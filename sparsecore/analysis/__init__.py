"""Analysis tools: how much of a model's computation does an input need? (see docs/analysis.md)

- :mod:`.hooks`: ``Tracer`` / ``Intervention``, the traced forward every tool runs through;
- :mod:`.graph`: the computation graph of one forward with normalised edge weights;
- :mod:`.strace`: s-Trace subgraphs and their evaluation against controls;
- :mod:`.density`: computation density over a set of inputs, its correlates and scaling;
- :mod:`.probe`, :mod:`.plan`: the compressed-sensing probe and the execution plans it yields;
- :mod:`.plots`, :mod:`.plots_probe`: figures (matplotlib); :mod:`.cli`: ``python -m sparsecore analyze``.

Needs torch and transformers (the ``hf`` extra); the figures need matplotlib (the ``analysis`` extra).
"""

from importlib import import_module
from typing import Any

# lazy (PEP 562): ``python -m sparsecore ...`` imports .cli through this package, and must not load torch
# before the analyze command has set OMP_WAIT_POLICY (nor at all for ``info`` and ``bench``)
_WHERE = {"density_study": "density", "spearman": "density", "ComputationGraph": "graph", "build_graph": "graph",
          "trace_graph": "graph", "Intervention": "hooks", "Tracer": "hooks", "ExecutionPlan": "plan",
          "run_plan": "plan", "omp": "probe", "probe_model": "probe", "recovery_vs_m": "probe",
          "synthetic_recovery": "probe", "TraceResult": "strace", "computation_density": "strace",
          "s_trace": "strace", "trace_input": "strace"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE)
