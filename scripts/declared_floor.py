"""Print the lowest version pyproject.toml declares for a package (``"name>=X"`` wherever it is listed);
fails when the listings disagree, so that one floor is tested. Usage: python3 scripts/declared_floor.py NAME"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def floors(name: str) -> set[str]:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pattern = re.compile(rf'"{re.escape(name)}(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;"\s]*)', re.IGNORECASE)
    return set(pattern.findall(text))


if __name__ == "__main__":
    found = floors(sys.argv[1])
    if len(found) != 1:
        sys.exit(f"declared_floor: {sys.argv[1]} has floors {sorted(found)} in pyproject.toml; expected exactly one")
    print(found.pop())
