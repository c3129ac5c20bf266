"""Turn pytest-benchmark JSON files into Markdown tables: median time per implementation and its
ratio to the sparsecore kernel of the same group.

    python perf/report.py perf/results/cpu-amd-epyc-2c/numba_cpu.json > table.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

#: implementation names that are baselines; every other one is a sparsecore kernel
BASELINES = ("scipy", "numpy", "torch", "cusparse", "cublas", "flashinfer")


def tables(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    mi = data.get("machine_info", {})
    lines = [f"Machine: {mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))}, "
             f"{mi.get('cpu', {}).get('count', '?')} logical CPUs; "
             f"commit {data.get('commit_info', {}).get('id', '?')[:10]}; {data.get('datetime', '')}", ""]
    for group, rows in groups.items():
        ours = [r for r in rows if not str(r["extra_info"].get("impl", "")).startswith(BASELINES)]
        base = min((r["stats"]["median"] for r in ours), default=None)
        lines += [f"**{group}**", "", "| implementation | median ms | min ms | median / fastest sparsecore median |",
                  "|---|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            name = r["extra_info"].get("impl", r["name"])
            if "density" in r["extra_info"]:
                name += f" density {r['extra_info']['density']:.1%} (nnz {r['extra_info']['nnz']})"
            med = r["stats"]["median"]
            ratio = f"{med / base:.2f}x" if base else "-"
            lines.append(f"| {name} | {med * 1e3:.2f} | {r['stats']['min'] * 1e3:.2f} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(tables(p))
