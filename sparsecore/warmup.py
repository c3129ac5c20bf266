"""``python -m sparsecore warmup``: compile the numba_cpu kernels ahead of time, and say so when a
call has to compile.

numba_cpu compiles each kernel lazily, on the first call with a new combination of argument types
(dtype, TiledELL with or without overflow, decode-size row kernels or grouped prefill kernels), and
caches the machine code on disk: ``$XDG_CACHE_HOME/sparsecore/numba`` (``~/.cache/sparsecore/numba``),
or ``NUMBA_CACHE_DIR`` when that is set. A process that finds a kernel in the cache loads it (well under
a second) instead of compiling it (seconds to tens of seconds, per kernel and argument types).

:func:`warmup` calls every op on small inputs that take each kernel path a real call takes, so that
later processes only load. :func:`install_compile_notice` prints one line on stderr the first time an
op compiles in a process, so a first call never spends seconds in silence; it listens to numba's
``numba:compile`` event (fired on a cache miss only) and reads the op and dtype from the backend's
call frame.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from ._progress import Progress

__all__ = ["cache_dir", "example_calls", "install_compile_notice", "compile_log", "warmup", "main",
           "add_parser", "KERNELS_MODULE", "DTYPES"]

#: the module whose numba functions are sparsecore's numba_cpu kernels
KERNELS_MODULE = "sparsecore.backends.numba_cpu.kernels"
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")


def cache_dir() -> str:
    """Where numba_cpu keeps compiled kernels (the rule of ``sparsecore.backends.numba_cpu._k``)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sparsecore", "numba")


# ------------------------------------------------------------------------------------------------
# the compile notice


@dataclass
class CompileRecord:
    op: str
    dtype: str
    kernel: str
    seconds: float


@dataclass
class _State:
    stream: TextIO | str | None = None  # None: record only; "stderr": sys.stderr at the time of writing
    told: set[tuple[str, str]] = field(default_factory=set)
    log: list[CompileRecord] = field(default_factory=list)
    starts: dict[int, list[float]] = field(default_factory=dict)
    installed: bool = False


_STATE = _State()
_LOCK = threading.Lock()


def _caller_op() -> tuple[str, str]:
    """(op, dtype) of the backend op class whose ``run`` is on the stack, else ("?", "?")."""
    f = sys._getframe(2)
    while f is not None:
        cls = f.f_locals.get("cls")
        if isinstance(cls, type) and getattr(cls, "OP", "") and getattr(cls, "BACKEND", ""):
            inp = f.f_locals.get("inp")
            try:
                dtype = str(inp.dtype) if inp is not None else "?"
            except Exception:  # noqa: BLE001 - a notice must never break a call
                dtype = "?"
            return str(cls.OP), dtype
        f = f.f_back
    return "?", "?"


def _is_ours(event: Any) -> bool:
    disp = (event.data or {}).get("dispatcher")
    return getattr(getattr(disp, "py_func", None), "__module__", "") == KERNELS_MODULE


def _make_listener() -> Any:
    from numba.core import event as ev

    class Notice(ev.Listener):
        def on_start(self, event: Any) -> None:
            if not _is_ours(event):
                return
            op, dtype = _caller_op()
            if op == "?":  # launched by a plan's launcher (no op class on the stack): name the kernel
                op, dtype = getattr(event.data["dispatcher"].py_func, "__name__", "?"), "(planned call)"
            with _LOCK:
                _STATE.starts.setdefault(threading.get_ident(), []).append(time.perf_counter())
                first = (op, dtype) not in _STATE.told
                _STATE.told.add((op, dtype))
            stream = sys.stderr if _STATE.stream == "stderr" else _STATE.stream
            if first and stream is not None:
                try:
                    stream.write(f"sparsecore: compiling numba_cpu kernels for {op} {dtype} (first use; takes "
                                 f"seconds once, then cached in {cache_dir()}; `python3 -m sparsecore warmup` "
                                 "compiles ahead of time)\n")
                    stream.flush()
                except (ValueError, OSError):  # a closed stream: the notice must never break a call
                    pass

        def on_end(self, event: Any) -> None:
            if not _is_ours(event):
                return
            op, dtype = _caller_op()
            with _LOCK:
                stack = _STATE.starts.get(threading.get_ident()) or [time.perf_counter()]
                t0 = stack.pop()
                if not stack:  # only outermost compiles: a nested one is part of its caller's time
                    name = getattr(event.data["dispatcher"].py_func, "__name__", "?")
                    _STATE.log.append(CompileRecord(op, dtype, name, time.perf_counter() - t0))

    return Notice()


def install_compile_notice(stream: TextIO | str | None = "stderr") -> bool:
    """Print one line on ``stream`` the first time each (op, dtype) compiles numba_cpu kernels in this
    process (default: whatever ``sys.stderr`` is when it prints; ``stream=None``: only record, see
    :func:`compile_log`). Imports numba; returns False when
    numba is not installed. Idempotent (a later call only changes the stream)."""
    _STATE.stream = stream
    if _STATE.installed:
        return True
    try:
        from numba.core import event as ev
    except ImportError:
        return False
    ev.register("numba:compile", _make_listener())
    _STATE.installed = True
    return True


def compile_log() -> list[CompileRecord]:
    """Every numba_cpu kernel compiled (not loaded from the cache) in this process since the notice was
    installed: op, dtype, kernel and seconds."""
    return list(_STATE.log)


# ------------------------------------------------------------------------------------------------
# inputs that take every kernel path


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    from ._arrays import BFLOAT16

    return x.astype(BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype))


def _sparse(rng: np.random.Generator, m: int, k: int, density: float, dtype: str) -> np.ndarray:
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[rng.random((m, k)) >= density] = 0
    return _cast(x, dtype)


def example_calls(op: str, dtype: str = "float32", backend: str = "numba_cpu") -> list[tuple[str, Callable[[], Any]]]:
    """``[(label, call)]``: calls of ``op`` on small ``dtype`` inputs, one per kernel path of numba_cpu
    (decode-size row kernels and grouped prefill kernels; TiledELL without and with overflow, CSR).
    The first is the typical first call (decode size, no overflow)."""
    from . import formats as F
    from . import ops
    from .ops.table import OPS, spec

    if op not in OPS:
        raise ValueError(f"example_calls: op = {op!r} is unknown; allowed: {', '.join(OPS)}")
    if dtype not in DTYPES:
        raise ValueError(f"example_calls: dtype = {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    rng = np.random.default_rng(0)
    be = {"backend": backend}
    k_dim, n_dim = 512, 64
    try:
        from .backends.numba_cpu import ROW_KERNEL_MAX_ROWS as rows_max
    except ImportError:  # pragma: no cover - the backend moved: a large M still takes the grouped path
        rows_max = 16
    big_m = rows_max + 16

    def ffn(m: int, density: float) -> tuple[np.ndarray, Any]:
        x = _sparse(rng, m, k_dim, density, dtype)
        return x, F.tiled_ell_from_dense(x)

    calls: list[tuple[str, Callable[[], Any]]] = []
    example = spec(op).example
    if example is not None:  # an op declared with its example call (its @op row)
        inp = example(rng, dtype)
        calls.append(("example", lambda: ops.dispatch(inp, backend)))
        return calls
    if op == "pack":
        x = _cast(rng.standard_normal((4, k_dim)).astype(np.float32), dtype)
        calls.append(("M=4, relu", lambda: ops.pack(x, activation="relu", **be)))
        return calls
    if op == "gated_pack":
        g, u = (_cast(rng.standard_normal((4, k_dim)).astype(np.float32), dtype) for _ in range(2))
        calls.append(("M=4, relu", lambda: ops.gated_pack(g, u, **be)))
        return calls
    shapes = {"decode": ffn(4, 0.05), "decode, overflow": ffn(4, 0.5), "prefill": ffn(big_m, 0.05),
              "prefill, overflow": ffn(big_m, 0.5)}
    shapes["decode, CSR"] = (shapes["decode"][0], F.csr_from_dense(shapes["decode"][0]))
    shapes["prefill, CSR"] = (shapes["prefill"][0], F.csr_from_dense(shapes["prefill"][0]))
    w = _cast(rng.standard_normal((k_dim, n_dim)).astype(np.float32), dtype)
    w_up = _cast(rng.standard_normal((k_dim, n_dim)).astype(np.float32), dtype)
    if op == "unpack":
        for label in ("decode", "decode, overflow"):
            a = shapes[label][1]
            calls.append((label, lambda a=a: ops.unpack(a, **be)))
        return calls
    if op in ("spmm", "sddmm", "spmm_t", "gated_ffn"):
        for label, (x, a) in shapes.items():
            m = x.shape[0]
            xd = _cast(rng.standard_normal((m, n_dim)).astype(np.float32), dtype)
            if op == "spmm":
                calls.append((label, lambda a=a: ops.spmm(a, w, **be)))
                if label == "decode":  # a decode-size call with much work: the row kernel's rows in parallel
                    aw = F.tiled_ell_from_dense(_sparse(rng, rows_max, 4096, 0.01, dtype))
                    ww = _cast(rng.standard_normal((4096, 1024)).astype(np.float32), dtype)
                    calls.append(("decode, wide W", lambda aw=aw, ww=ww: ops.spmm(aw, ww, **be)))
            elif op == "sddmm":
                calls.append((label, lambda a=a, xd=xd: ops.sddmm(xd, w, a, **be)))
            elif op == "spmm_t":
                calls.append((label, lambda a=a, xd=xd: ops.spmm_t(a, xd, **be)))
            else:
                calls.append((label, lambda a=a, xd=xd: ops.gated_ffn(xd, a, w_up, w, **be)))
        return calls
    b, s, hq, hkv, d = 1, 1024, 4, 2, 32
    k = _cast(rng.standard_normal((b, s, hkv, d)).astype(np.float32), dtype)
    v = _cast(rng.standard_normal((b, s, hkv, d)).astype(np.float32), dtype)
    kv = F.DenseKV(k, v, np.full(b, s, np.int32))
    q = _cast(rng.standard_normal((b, hq, d)).astype(np.float32), dtype)
    # a long context with a batch: enough work for the thread pool and (decode) split rows
    bl, sl, hql = 2, 8192, 8
    kl = _cast(rng.standard_normal((bl, sl, hkv, d)).astype(np.float32), dtype)
    kvl = F.DenseKV(kl, kl, np.full(bl, sl, np.int32))
    ql = _cast(rng.standard_normal((bl, hql, d)).astype(np.float32), dtype)
    if op == "page_bounds":
        calls.append(("build", lambda: ops.page_bounds(kv, 16, **be)))
        calls.append(("long, parallel", lambda: ops.page_bounds(kvl, 16, **be)))
    elif op == "select_topk":
        calls.append(("exact", lambda: ops.select_topk(q, kv, 32, **be)))
        calls.append(("quest", lambda: ops.select_topk(q, kv, 4, method="quest", page_size=16, **be)))
        calls.append(("long, exact, parallel", lambda: ops.select_topk(ql, kvl, 256, **be)))
        calls.append(("long, quest, parallel",
                      lambda: ops.select_topk(ql, kvl, 16, method="quest", page_size=16, **be)))
    elif op == "sparse_decode":
        idx = ops.select_topk(q, kv, s // 2, backend="reference")
        calls.append(("shared", lambda: ops.sparse_decode(q, kv, idx, **be)))
        idxl = ops.select_topk(ql, kvl, sl // 2, backend="reference")
        calls.append(("long, parallel, split", lambda: ops.sparse_decode(ql, kvl, idxl, **be)))
    elif op == "dense_decode":
        calls.append(("", lambda: ops.dense_decode(q, kv, **be)))
        calls.append(("long, parallel, split", lambda: ops.dense_decode(ql, kvl, **be)))
    elif op == "merge_attention":
        o = _cast(rng.standard_normal((b, hq, d)).astype(np.float32), dtype)
        lse = rng.standard_normal((b, hq)).astype(np.float32)
        calls.append(("", lambda: ops.merge_attention(o, lse, o, lse, **be)))
    return calls


# ------------------------------------------------------------------------------------------------
# the command


def _parse_list(values: Sequence[str] | None, allowed: Sequence[str], name: str) -> list[str]:
    if not values:
        return list(allowed)
    out: list[str] = []
    for v in values:
        for item in v.split(","):
            item = item.strip()
            if not item:
                continue
            if item not in allowed:
                raise ValueError(f"warmup: --{name} {item!r} is not allowed; allowed: {', '.join(allowed)}")
            if item not in out:
                out.append(item)
    return out


def warmup(ops: Sequence[str] | None = None, dtypes: Sequence[str] = ("float32",), *,
           stream: TextIO | None = sys.stderr) -> list[dict[str, Any]]:
    """Compile (or load from the cache) the numba_cpu kernels of ``ops`` x ``dtypes``; one progress line
    per (op, dtype) on ``stream``. Returns one dict per (op, dtype): seconds, kernels compiled."""
    from .ops.dispatcher import implementations
    from .ops.table import OPS

    ops = _parse_list(ops, OPS, "ops")
    dtypes = _parse_list(dtypes, DTYPES, "dtypes")
    cpu = [c for c in implementations(ops[0]) if c.NAME == "numba_cpu"]
    reasons = cpu[0].availability_reasons() if cpu else ["numba_cpu is not registered"]
    if reasons:
        raise RuntimeError("warmup: the numba_cpu backend cannot run here: " + "; ".join(reasons))
    install_compile_notice(None)  # record compiles; the progress line says what happens
    p = Progress(len(ops) * len(dtypes), "warmup", stream=stream, enabled=stream is not None)
    rows = []
    for dtype in dtypes:
        for op in ops:
            p.step(f"{op} {dtype}")
            before = len(_STATE.log)
            t0 = time.perf_counter()
            for _, call in example_calls(op, dtype):
                call()
            dt = time.perf_counter() - t0
            compiled = _STATE.log[before:]
            rows.append({"op": op, "dtype": dtype, "seconds": dt, "kernels_compiled": len(compiled),
                         "compile_seconds": sum(r.seconds for r in compiled)})
            state = (f"compiled {len(compiled)} kernel{'s' * (len(compiled) != 1)}" if compiled
                     else "loaded from the cache")
            p.note(f"  {op:<16}{dtype:<10}{dt:7.2f} s  {state}")
    p.done(f"{len(rows)} op x dtype pair{'s' * (len(rows) != 1)} ready")
    return rows


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    from .ops.table import OPS

    w = sub.add_parser("warmup", formatter_class=formatter, description=__doc__,
                       help="compile the numba_cpu kernels ahead of time (first calls then load from the cache)")
    w.add_argument("--ops", action="append", metavar="OP[,OP...]",
                   help=f"ops to compile (repeatable or comma-separated; default: all: {', '.join(OPS)})")
    w.add_argument("--dtypes", action="append", metavar="DTYPE[,DTYPE...]",
                   help=f"value dtypes (repeatable or comma-separated; allowed: {', '.join(DTYPES)}; "
                        "default: float32)")


def main(args: argparse.Namespace) -> int:
    print(f"sparsecore warmup: numba_cpu kernel cache: {cache_dir()} (set NUMBA_CACHE_DIR to move it)",
          file=sys.stderr, flush=True)
    try:
        rows = warmup(args.ops, args.dtypes or ["float32"])
    except (ValueError, RuntimeError) as e:
        print(e, file=sys.stderr)
        return 2
    total = sum(r["seconds"] for r in rows)
    compiled = sum(r["kernels_compiled"] for r in rows)
    print(f"{len(rows)} op x dtype pairs in {total:.1f} s; {compiled} kernels compiled, the rest loaded from "
          f"{cache_dir()}")
    return 0
