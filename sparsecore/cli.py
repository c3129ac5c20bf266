"""``python -m sparsecore info | bench | analyze``."""

from __future__ import annotations

import argparse
import sys

from ._env import gpus, host, library_versions
from .ops.dispatcher import BACKEND_PRIORITY, TABLE, implementations


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
    print("\nop x backend (the dispatcher takes the first available one that supports the inputs):")
    for spec in TABLE:
        op = spec.name
        print(f"  {op}")
        for cls in implementations(op):
            reasons = cls.availability_reasons()
            state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            print(f"    {cls.NAME:<22}{cls.DEVICE:<6}{','.join(cls.DTYPES):<36}{state}")
        missing = [b for b in BACKEND_PRIORITY if b not in {c.BACKEND for c in implementations(op)}]
        if missing:
            print(f"    {'(not implemented)':<22}{', '.join(missing)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsecore", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="every op x backend, available or not and why; versions; GPU")
    b = sub.add_parser("bench", help="time every available backend beside a dense baseline")
    b.add_argument("--scale", choices=("small", "large"), default="small",
                   help="small: seconds on any backend; large: the shapes of docs/benchmarks.md")
    b.add_argument("--backend", action="append", help="only this backend or variant (repeatable)")
    b.add_argument("--json", help="write the rows and the environment to this file")
    b.add_argument("--min-time", type=float, default=0.2, help="seconds to spend timing each call")
    from .analysis.cli import add_parser as add_analyze

    add_analyze(sub)
    args = p.parse_args(argv)
    if args.cmd == "info":
        return info()
    if args.cmd == "analyze":
        from .analysis.cli import main as analyze_main

        return analyze_main(args)
    from .bench import main as bench_main

    return bench_main(args.scale, args.json, args.backend, args.min_time)


if __name__ == "__main__":
    sys.exit(main())
