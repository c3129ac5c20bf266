"""Benchmark suites (pytest-benchmark). Not collected by the test command; run them with
``python -m pytest perf --benchmark-only --benchmark-json=perf/results/<machine>/<name>.json``
and turn the JSON into tables with ``python perf/report.py``."""

import numpy as np
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu: host benchmarks")


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)
