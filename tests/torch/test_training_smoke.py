"""A few training steps of examples/train_sparse_llama.py on CPU: with the ReLU gate and the L1 penalty
the FFN activation sparsity rises and the loss falls (a tiny model, a few KB of the standard library's
sources, fixed seeds: deterministic)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location("train_sparse_llama", ROOT / "examples" / "train_sparse_llama.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_sparse_llama", mod)
    spec.loader.exec_module(mod)
    return mod


def test_corpus_is_deterministic_and_split():
    ex = _example()
    a = ex.stdlib_corpus(6000, 3000)
    b = ex.stdlib_corpus(6000, 3000)
    assert a == b
    train, held, info = a
    assert len(train) == 6000 and len(held) == 3000
    assert info["train_files"] >= 1 and info["heldout_files"] >= 1
    assert train[:3000] != held


def test_sparsity_rises_and_loss_falls(tmp_path):
    ex = _example()
    threads = torch.get_num_threads()
    out = tmp_path / "smoke.json"
    try:
        res = ex.main(["--steps", "40", "--batch", "8", "--seq", "32", "--hidden", "32", "--layers", "2",
                       "--heads", "2", "--lr", "5e-3", "--l1", "5e-3", "--l1-warmup", "0.5", "--threshold", "0.0",
                       "--max-train-bytes", "6000", "--max-heldout-bytes", "3000", "--eval-windows", "8",
                       "--time-steps", "2", "--log-every", "1", "--threads", "1", "--only", "sparse",
                       "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    log = res["sparse"]["log"]
    assert [r["step"] for r in log] == list(range(40))
    first, last = log[:3], log[-5:]

    def mean(rows, f):
        return sum(f(r) for r in rows) / len(rows)

    sp = lambda r: sum(r["sparsity_per_layer"]) / len(r["sparsity_per_layer"])  # noqa: E731
    assert mean(first, sp) < 0.7  # a random ReLU gate fires about half the time
    assert mean(last, sp) > mean(first, sp) + 0.2
    assert mean(last, lambda r: r["ce"]) < mean(first, lambda r: r["ce"]) - 1.0
    assert res["sparse"]["loss"] < res["initial_heldout_loss"] - 1.0
    assert len(res["sparse"]["sparsity_per_layer"]) == 2
    assert json.loads(out.read_text())["sparse"]["loss"] == pytest.approx(res["sparse"]["loss"])


def test_reinit_dead_units_keeps_the_function_and_revives_units():
    ex = _example()
    args = ex.argparse.Namespace(seed=0, hidden=32, ffn_mult=4, layers=2, heads=2, seq=16)
    model = ex.patch_model(ex.build(args), ffn=dict(tile=128, threshold=0.0))
    mlps = [m for m in model.modules() if isinstance(m, ex.SparseGatedMLP)]
    dead = torch.tensor([3, 40, 77])
    with torch.no_grad():
        mlps[1].gate_proj.weight[dead] = 0.0          # relu(0) never fires: these units are dead
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model(input_ids=batches[0][:, :-1]).logits.sum().backward()
    opt.step()                                          # AdamW state exists for every weight
    with torch.no_grad():
        before = model(input_ids=batches[1][:, :-1]).logits
    counts = ex.reinit_dead_units(model, opt, batches, 0.0, torch.Generator().manual_seed(1))
    assert counts[0] == 0 and counts[1] == 3
    w = mlps[1]
    assert (w.gate_proj.weight[dead].abs().sum(1) > 0).all()                 # fresh gate rows
    assert (w.down_proj.weight[:, dead] == 0).all()                          # ... that add nothing yet
    assert (opt.state[w.gate_proj.weight]["exp_avg_sq"][dead] == 0).all()
    assert (opt.state[w.down_proj.weight]["exp_avg"][:, dead] == 0).all()
    with torch.no_grad():
        after = model(input_ids=batches[1][:, :-1]).logits
    torch.testing.assert_close(after, before)          # the function is unchanged by the re-initialisation
