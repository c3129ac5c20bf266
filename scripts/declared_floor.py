"""The lowest versions pyproject.toml declares (``"name>=X"``), for CI's lowest-versions run.

    python3 scripts/declared_floor.py NAME     the floor of one package (fails when listings disagree)
    python3 scripts/declared_floor.py --pins   ``name==X.*`` for every floored requirement of the
                                               dependencies and the extras a CPU machine installs
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

#: extras of GPU libraries: a CPU machine does not install them, so CI cannot test their floors here
GPU_ONLY = {"cupy-cuda12x", "cuda-python", "cuda-core", "numba-cuda"}

_REQ = re.compile(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;"\s]*)"')


def declared() -> list[tuple[str, str]]:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    text = text[text.index("[project]"):text.index("[project.scripts]")]  # not the build system's
    return [(m.group(1).lower().replace("_", "-"), m.group(2)) for m in _REQ.finditer(text)]


def floors(name: str) -> set[str]:
    name = name.lower().replace("_", "-")
    return {v for n, v in declared() if n == name}


def pins() -> list[str]:
    out: dict[str, str] = {}
    for n, v in declared():
        if n in GPU_ONLY:
            continue
        if out.setdefault(n, v) != v:
            sys.exit(f"declared_floor: {n} has floors {out[n]} and {v} in pyproject.toml; make them one")
    return [f"{n}=={v}.*" for n, v in sorted(out.items())]


if __name__ == "__main__":
    if sys.argv[1:] == ["--pins"]:
        print(" ".join(pins()))
        sys.exit(0)
    found = floors(sys.argv[1])
    if len(found) != 1:
        sys.exit(f"declared_floor: {sys.argv[1]} has floors {sorted(found)} in pyproject.toml; expected exactly one")
    print(found.pop())
