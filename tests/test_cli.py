"""The command line: help without arguments, defaults in every help, info grouped by backend, the bench's
rows (spread, speedup, 'SLOWER', mismatches, labels never cut, JSON/CSV/plots), warmup and the compile notice."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparsecore import bench
from sparsecore.cli import build_parser, main
from sparsecore.ops import dispatcher as D

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict[str, str] | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "sparsecore", *args]
    return subprocess.run(cmd + (args if code else []), capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)


def test_no_arguments_prints_help_and_exits_0(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sparsecore ")
    for cmd in ("info", "bench", "warmup", "analyze"):
        assert cmd in out
    res = _run([])
    assert res.returncode == 0 and res.stdout.startswith("usage: sparsecore "), res.stderr


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    act = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(act.choices)


def test_every_option_has_help_and_help_shows_defaults():
    p = build_parser()
    for name, sp in _subparsers(p).items():
        text = sp.format_help()
        assert text.startswith(f"usage: sparsecore {name}"), text[:80]
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help != argparse.SUPPRESS, f"{name}: {a.dest} has no help"
            if a.option_strings and a.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {a.default})" in " ".join(text.split()), f"{name}: {a.dest} hides its default"


def test_info_groups_backends_with_one_reason_each(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    section = out.split("\nbackends:\n")[1].split("\nops:\n")[0]
    for b in D.BACKEND_PRIORITY:
        assert sum(line.startswith(f"  {b} ") for line in section.splitlines()) == 1, b
    for b in D.BACKEND_PRIORITY:
        reasons = {r for op in D.OPS for c in D.implementations(op) if c.BACKEND == b
                   for r in c.availability_reasons()}
        for r in reasons:
            assert out.count(r) == 1, f"the reason {r!r} is repeated"


def _block(impls: list[bench.Impl], title: str = "t") -> bench.Block:
    return bench.Block(title, {"family": "ffn", "op": "spmm", "shape": "s", "M": 1, "density": 0.1},
                       [i.name for i in impls], impls[0].name, lambda: impls)


def test_rows_show_spread_speedup_and_say_slower():
    slow = lambda: time.sleep(0.008)  # noqa: E731
    middle = lambda: time.sleep(0.001)  # noqa: E731  (sleeps, not no-ops: the order must not be noise)
    fast = lambda: None  # noqa: E731
    out = io.StringIO()
    long = "a peer with a label far longer than any column width one would guess for it " * 2
    rows = bench.run_blocks([_block([bench.Impl("sparsecore slow", slow, True), bench.Impl(long, middle, False),
                                     bench.Impl("sparsecore fast", fast, True, against=long)])],
                            min_time=0.0, max_repeat=5, out=out, progress=False)
    text = out.getvalue()
    assert long in text  # labels are never cut
    main_row, peer, ours_fast = rows
    for r in rows:
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] >= 3
    assert "speedup" not in main_row
    line = {n: next(x for x in text.splitlines() if x.startswith(f"  {n}")) for n in (long, "sparsecore fast")}
    assert peer["slower"] and peer["speedup"] < 1 and "sparsecore SLOWER" in line[long]
    assert ours_fast["vs"] == long and ours_fast["speedup"] > 1
    assert f"this faster than {long}" in line["sparsecore fast"]


def test_a_wrong_result_is_a_mismatch(tmp_path, capsys):
    ref = np.ones(4)
    rows = bench.run_blocks([_block([bench.Impl("sparsecore x", lambda: ref + 1, True, bench._checker(ref)),
                                     bench.Impl("peer", lambda: ref.copy(), False, bench._checker(ref))])],
                            min_time=0.0, max_repeat=3, progress=False)
    assert rows[0]["ok"] is False and rows[1]["ok"] is True
    assert "MISMATCH" in capsys.readouterr().out


def test_bench_quick_main_suite_writes_json_csv_and_plots(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("scipy")
    pytest.importorskip("matplotlib")
    j, c, d = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "plots"
    rc = main(["bench", "--quick", "--min-time", "0", "--max-repeat", "3", "--json", str(j), "--csv", str(c),
               "--plot", str(d)])
    cap = capsys.readouterr()
    assert rc == 0, cap.out
    assert "bench [1/" in cap.err  # the progress line
    data = json.loads(j.read_text())
    rows = data["rows"]
    assert {r["family"] for r in rows} == {"ffn", "decode"}
    impls = {r["impl"] for r in rows}
    for name in ("torch dense matmul", "torch sparse CSR @ dense", "SciPy CSR @ dense", "NumPy dense matmul",
                 "torch gather + SDPA (same keys)", "torch dense SDPA", "sparsecore DecodePlan.run (quest)"):
        assert name in impls
    timed = [r for r in rows if "median_ms" in r]
    assert timed and all(r["ok"] for r in timed)
    assert all(r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in timed)
    assert all("speedup" in r for r in timed if not r["main"])
    for r in timed:  # every label printed whole, and a slower row says so
        assert r["impl"] in cap.out
    if any(r.get("slower") for r in timed):
        assert "SLOWER" in cap.out
    with open(c) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for png in ("speedup_vs_density.png", "speedup_vs_context.png"):
        assert (d / png).stat().st_size > 5000


def test_bench_progress_starts_within_two_seconds():
    code = ("import sys, time; t0 = time.time(); from sparsecore.cli import main; "
            "sys.exit(main(['bench', '--quick', '--family', 'decode', '--min-time', '0', '--max-repeat', '1']))")
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env=e, cwd=ROOT)
    first = p.stderr.readline()
    elapsed = time.time() - t0
    p.kill()
    p.wait()
    assert first.startswith("bench: main suite (quick)")
    assert elapsed < 2.0 * (3 if os.environ.get("CI_SLOW") else 1), elapsed


def test_warmup_compiles_then_loads_and_the_first_call_says_so(tmp_path):
    pytest.importorskip("numba")
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    first = _run(["warmup", "--ops", "merge_attention"], env)
    assert first.returncode == 0, first.stderr
    assert str(tmp_path / "cache") in first.stderr
    assert "[1/1] merge_attention float32" in first.stderr and "compiled 1 kernel" in first.stderr
    again = _run(["warmup", "--ops", "merge_attention"], env)
    assert "loaded from the cache" in again.stderr, again.stderr
    code = ("import numpy as np, sparsecore as sc, sparsecore.warmup as w; w.install_compile_notice(); "
            "o = np.ones((1, 2, 4), np.float16); l = np.zeros((1, 2), np.float32); "
            "[sc.merge_attention(o, l, o, l) for _ in range(2)]; "
            "o32 = o.astype(np.float32); sc.merge_attention(o32, l, o32, l)")
    res = _run([], env, code=code)
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.startswith("sparsecore: compiling")]
    assert lines == [f"sparsecore: compiling numba_cpu kernels for merge_attention float16 (first use; takes seconds "
                     f"once, then cached in {tmp_path / 'cache'}; `python3 -m sparsecore warmup` compiles ahead of "
                     "time)"], res.stderr  # float32 was warmed up: loaded, no notice


def test_warmup_rejects_unknown_names():
    from sparsecore.warmup import warmup

    with pytest.raises(ValueError, match=r"--ops 'nope' is not allowed; allowed: pack, gated_pack, unpack"):
        warmup(["nope"])
    with pytest.raises(ValueError, match=r"--dtypes 'float64' is not allowed; allowed: float32, float16, bfloat16"):
        warmup(["spmm"], ["float64"])
