"""sparsecore: sparse kernels for LLMs (activation-sparse FFNs, top-k sparse decode attention).

Commands: ``info`` (backends, why each is or is not available, ops per backend), ``bench`` (where
sparsecore wins and loses beside torch, SciPy and NumPy), ``warmup`` (compile the numba_cpu kernels
ahead of time), ``analyze`` (computation density of a model on a text). ``sparsecore COMMAND --help``
shows each command's options and defaults.
"""

from __future__ import annotations

import argparse
import sys

from ._env import gpus, host, library_versions
from .ops.dispatcher import BACKEND_PRIORITY, TABLE, implementations

PROG = "sparsecore"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help; descriptions keep their line breaks."""


def info() -> int:
    h = host()
    print(f"sparsecore on Python {h['python']}, {h['platform']}")
    print(f"CPU: {h['cpu']} ({h['cores']} cores)")
    g = gpus()
    print("GPU: " + ("; ".join(g) if g else "none found (nvidia-smi absent or no device)"))
    print("\nlibraries:")
    for name, ver in library_versions().items():
        print(f"  {name:<18}{ver or 'not installed'}")
    print(f"\nbackend priority: {' > '.join(BACKEND_PRIORITY)}")
    print("(the dispatcher takes the first available backend that supports the inputs' device and dtype)")
    # group: backend -> its classes over every op; one availability reason per backend
    by_backend: dict[str, list[type]] = {b: [] for b in BACKEND_PRIORITY}
    for spec in TABLE:
        for cls in implementations(spec.name):
            by_backend[cls.BACKEND].append(cls)
    print("\nbackends:")
    for backend, classes in by_backend.items():
        if not classes:
            print(f"  {backend:<13}no ops implemented")
            continue
        reasons: list[str] = []
        for c in classes:
            for r in c.availability_reasons():
                if r not in reasons:
                    reasons.append(r)
        first = classes[0]
        state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        print(f"  {backend:<13}{first.DEVICE:<6}{state}")
        ops_done = [s.name for s in TABLE if any(c.OP == s.name for c in classes)]
        missing = [s.name for s in TABLE if s.name not in ops_done]
        dtypes = sorted({d for c in classes for d in c.DTYPES}, key=lambda d: (len(d), d))
        print(f"    dtypes: {', '.join(dtypes)}")
        print(f"    ops ({len(ops_done)}): {', '.join(ops_done)}" + (f"; not implemented: {', '.join(missing)}"
                                                                        if missing else ""))
        variants = [f"{c.OP}:{c.NAME}" for c in classes if c.NAME != c.BACKEND]
        if variants:
            print(f"    variants: {', '.join(variants)}")
    print("\nops:")
    for spec in TABLE:
        names = [c.NAME for c in implementations(spec.name)]
        print(f"  {spec.name}\n    -> {spec.returns}; implementations: {', '.join(names)}")
    print("\n`sparsecore bench` times them; `sparsecore warmup` compiles the numba_cpu kernels ahead of time;"
          " sparsecore.explain(op, *args) says which backend a call runs on and why.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("info", formatter_class=HelpFormatter,
                   help="backends (available or not, and why), ops per backend, library versions, GPU",
                   description="Backends in dispatch priority, each with one reason when it is unavailable and "
                               "its ops; library versions and the GPU.")
    from .bench import __doc__ as bench_doc

    b = sub.add_parser("bench", formatter_class=HelpFormatter, description=bench_doc,
                       help="where sparsecore wins and loses beside torch, SciPy and NumPy (table, JSON, CSV, plots)")
    b.add_argument("--suite", choices=("main", "ops"), default="main",
                   help="main: the shapes users run beside the peers a user would pick; ops: every op on every "
                        "backend beside a dense NumPy baseline")
    b.add_argument("--quick", action="store_true", help="a short run of the same kinds of rows (what the tests run)")
    b.add_argument("--family", action="append", choices=("ffn", "decode"),
                   help="main suite: only these blocks (repeatable; default: both)")
    b.add_argument("--scale", choices=("small", "large"), default="small",
                   help="ops suite: small runs in seconds on any backend; large: the shapes of docs/benchmarks.md")
    b.add_argument("--backend", action="append", help="ops suite: only this backend or variant (repeatable; "
                   "default: every available one)")
    b.add_argument("--min-time", type=float, default=None,
                   help="seconds to keep repeating each call (at least 3-5 repeats; default 0.2, 0.02 with --quick)")
    b.add_argument("--max-repeat", type=int, default=50, help="at most this many timed calls per row")
    b.add_argument("--json", metavar="PATH", help="write the rows and the environment to this JSON file")
    b.add_argument("--csv", metavar="PATH", help="write the rows to this CSV file")
    b.add_argument("--plot", metavar="DIR", help="write speedup_vs_density.png and speedup_vs_context.png here")
    b.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    from .warmup import add_parser as add_warmup

    add_warmup(sub, HelpFormatter)
    from .analysis.cli import add_parser as add_analyze

    add_analyze(sub, HelpFormatter)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.cmd is None:
        p.print_help()
        return 0
    if args.cmd == "info":
        return info()
    if args.cmd == "warmup":
        from .warmup import main as warmup_main

        return warmup_main(args)
    if args.cmd == "analyze":
        from .analysis.cli import main as analyze_main

        return analyze_main(args)
    from .bench import main as bench_main

    if args.min_time is not None and args.min_time < 0:
        p.error(f"bench: --min-time = {args.min_time}; must be >= 0")
    if args.max_repeat < 1:
        p.error(f"bench: --max-repeat = {args.max_repeat}; must be >= 1")
    return bench_main(args.suite, quick=args.quick, scale=args.scale, json_path=args.json, csv_path=args.csv,
                      plot_dir=args.plot, backends=args.backend, families=args.family or ("ffn", "decode"),
                      min_time=args.min_time, max_repeat=args.max_repeat, progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
