"""What this machine has: library versions and GPUs, found without importing heavy libraries."""

from __future__ import annotations

import platform
import shutil
import subprocess
from importlib import metadata

LIBRARIES = ("numpy", "ml_dtypes", "scipy", "torch", "numba", "numba-cuda", "cupy-cuda12x", "cupy-cuda13x",
             "cupy", "cuda-python", "cuda-bindings", "cuda-core", "hypothesis", "pytest-benchmark")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpus() -> list[str]:
    """GPU names and memory from nvidia-smi; empty when there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        res = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in res.stdout.splitlines() if line.strip()] if res.returncode == 0 else []


def host() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cores": str(os.cpu_count())}


def git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=__file__.rsplit("/", 2)[0])
        return res.stdout.strip() or None if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
