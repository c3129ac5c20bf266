"""``python -m sparsecore analyze`` end to end on a tiny random model (JSON and figures written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from sparsecore.cli import main  # noqa: E402

TEXT = (b"def f(x):\n    return x * 2 + 1\n\nclass A:\n    pass\n" * 8)


def test_analyze_random_writes_json_and_figures(tmp_path: Path) -> None:
    text = tmp_path / "t.py"
    text.write_bytes(TEXT)
    out = tmp_path / "out"
    rc = main(["analyze", str(text), "--random", "--out", str(out), "--inputs", "4", "--length", "24",
               "--context-lengths", "12,24", "--probe-inputs", "1", "--probe-m", "8,16", "--synthetic-p", "32",
               "--synthetic-k", "2"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"] == ["random_seed0", "random_seed1"]
    study = json.loads((out / "density.json").read_text())
    assert study["n_inputs"] == 4 and study["n_tokens"] == 24 and study["context_lengths"] == [12, 24]
    assert len(study["cross_model"]) == 1
    for m in study["models"].values():
        assert len(m["inputs"]) == 4
        assert all(0.0 <= r["density"] <= 1.0 for r in m["inputs"])
    probe = json.loads((out / "probe.json").read_text())
    assert set(probe) >= {"synthetic", "recovery_vs_m", "inputs"}
    run = probe["inputs"][0]["run"]
    assert run["full_tv"] < 1e-4                  # the full execution plan reproduces the model
    for fig in summary["figures"].values():
        assert Path(fig).stat().st_size > 1000


def test_analyze_bad_arguments(tmp_path: Path) -> None:
    text = tmp_path / "t.py"
    text.write_bytes(TEXT[:40])
    with pytest.raises(SystemExit, match="--model"):
        main(["analyze", str(text), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="tokens"):
        main(["analyze", str(text), "--random", "--out", str(tmp_path / "o"), "--inputs", "4", "--length", "64"])
    with pytest.raises(SystemExit, match="config.json"):
        main(["analyze", str(text), "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="context-lengths"):
        main(["analyze", str(text), "--random", "--out", str(tmp_path / "o"), "--inputs", "2", "--length", "8",
              "--context-lengths", "a,b"])


def test_package_names_resolve_lazily() -> None:
    import subprocess
    import sys

    import sparsecore.analysis as analysis

    for name in analysis.__all__:
        assert getattr(analysis, name).__name__ == name
    # the CLI parser imports sparsecore.analysis.cli; that must not load torch (info/bench stay light, and
    # analyze sets OMP_WAIT_POLICY before torch loads its OpenMP runtime)
    code = "import sys, sparsecore.cli, sparsecore.analysis.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_analyze_smollm2_arguments_are_checked_before_loading(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--random"):
        main(["analyze", "--model", "smollm2", "--random", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="context-lengths"):
        main(["analyze", "--model", "smollm2", "--out", str(tmp_path / "o"), "--length", "8",
              "--context-lengths", "4,16"])
    with pytest.raises(SystemExit, match="text file"):
        main(["analyze", "--random", "--out", str(tmp_path / "o")])
