"""Train a small byte-level LLaMA-style model with a ReLU gate and an L1 penalty on the FFN hidden
activations (the TwELL recipe), beside the same model and seed without the penalty (the dense twin).

The corpus is the Python standard library shipped with the interpreter (every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]``, outside ``site-packages`` and the test suites, in sorted path
order); a file goes to the held-out split when ``crc32(relative path) % 10 == 0``, so the split is
deterministic and no held-out file is ever trained on.

- sparse model: ``patch_model(model, ffn=...)`` (every ``LlamaMLP`` becomes a ``SparseGatedMLP``: ReLU
  gate packed to TiledELL, fused up+down over the gate's non-zeros, sparse backward) and the loss
  ``CE + coef(step) * total_l1(model)``; ``coef`` ramps linearly from 0 to ``--l1`` over
  ``--l1-warmup`` of the steps and then stays.
- dense twin: the same config (``hidden_act="relu"``), same initial weights, same batches, plain
  transformers ``LlamaMLP``, loss ``CE`` only.

Reports (JSON on stdout and in ``--out``): held-out cross-entropy of both, the relative loss increase,
the fraction of zero hidden activations per layer on the held-out text (for both), and the median step
time (forward + backward + optimizer step) of each model. Pin the thread pools: numba's and torch's
both spin on the same cores and slow each other down if they disagree::

    NUMBA_NUM_THREADS=2 OMP_NUM_THREADS=2 python examples/train_sparse_llama.py --threads 2 --out training.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsecore.torch.modules import SparseGatedMLP, ffn_sparsity_stats, total_l1
from sparsecore.torch.patch import patch_model

SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


# --- data ------------------------------------------------------------------------------------------------------

def stdlib_corpus(max_train: int, max_heldout: int, root: str | None = None) -> tuple[bytes, bytes, dict]:
    """(train bytes, held-out bytes, description) from the interpreter's standard library sources."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in base.rglob("*.py") if not (SKIP_DIRS & set(p.relative_to(base).parts)))
    train, held = bytearray(), bytearray()
    n_train = n_held = 0
    for p in files:
        rel = p.relative_to(base).as_posix()
        to_held = zlib.crc32(rel.encode()) % 10 == 0
        buf, cap = (held, max_heldout) if to_held else (train, max_train)
        if len(buf) >= cap:
            if len(train) >= max_train and len(held) >= max_heldout:
                break
            continue
        try:
            data = p.read_bytes()
        except OSError:
            continue
        buf += data[: cap - len(buf)]
        if to_held:
            n_held += 1
        else:
            n_train += 1
    info = {"root": str(base), "python": platform.python_version(), "train_files": n_train,
            "heldout_files": n_held, "train_bytes": len(train), "heldout_bytes": len(held),
            "train_crc32": zlib.crc32(train), "heldout_crc32": zlib.crc32(held)}
    return bytes(train), bytes(held), info


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches of ``batch`` random windows of ``seq + 1`` bytes (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (steps, batch), generator=g)
    idx = starts.unsqueeze(-1) + torch.arange(seq + 1)
    return list(data[idx].long())


def heldout_windows(data: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """``n`` evenly spaced, non-overlapping windows of ``seq + 1`` bytes of the held-out text."""
    stride = (data.numel() - seq - 1) // max(n, 1)
    if stride < seq + 1:
        raise ValueError(f"held-out text too short for {n} windows of {seq + 1} bytes")
    starts = torch.arange(n) * stride
    return data[starts.unsqueeze(-1) + torch.arange(seq + 1)].long()


# --- model -----------------------------------------------------------------------------------------------------

def build(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.ffn_mult * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=args.seq, hidden_act="relu", tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def unit_stats(model: LlamaForCausalLM, windows: torch.Tensor, batch: int) -> dict:
    """On a plain (unpatched) model: per layer, the hidden units that never fire on ``windows`` (dead)
    and the held-out loss with every FFN's output replaced by zeros (what a dead FFN would give)."""
    fired = [torch.zeros(layer.mlp.gate_proj.out_features, dtype=torch.bool) for layer in model.model.layers]

    def mark(i: int) -> Any:
        def hook(mod: Any, inp: Any, out: torch.Tensor) -> None:  # returns None: the output is unchanged
            fired[i] |= (out > 0).reshape(-1, out.shape[-1]).any(0)
        return hook

    hooks = [layer.mlp.act_fn.register_forward_hook(mark(i)) for i, layer in enumerate(model.model.layers)]
    was = model.training
    model.eval()
    for i in range(0, windows.shape[0], batch):
        model(input_ids=windows[i:i + batch, :-1])
    for h in hooks:
        h.remove()
    hooks = [layer.mlp.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
             for layer in model.model.layers]
    tot = sum(float(lm_loss(model, windows[i:i + batch])) * windows[i:i + batch].shape[0]
              for i in range(0, windows.shape[0], batch))
    for h in hooks:
        h.remove()
    model.train(was)
    return {"dead_unit_fraction_per_layer": [1.0 - float(f.float().mean()) for f in fired],
            "heldout_loss_without_ffn": tot / windows.shape[0]}


def lm_loss(model: LlamaForCausalLM, win: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=win[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), win[:, 1:].reshape(-1))


def dense_zero_fraction_hooks(model: LlamaForCausalLM) -> tuple[list, list[list[float]]]:
    """Forward hooks counting exact zeros of ``act_fn(gate_proj(x))`` in each plain LlamaMLP."""
    counts: list[list[float]] = [[0.0, 0.0] for _ in model.model.layers]
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(mod: Any, inp: Any, out: torch.Tensor, i: int = i) -> None:
            counts[i][0] += float((out == 0).sum())
            counts[i][1] += out.numel()
        hooks.append(layer.mlp.act_fn.register_forward_hook(hook))
    return hooks, counts


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, windows: torch.Tensor, batch: int) -> dict:
    """Held-out cross-entropy (nats/byte) and the fraction of zero FFN hidden activations per layer."""
    was = model.training
    model.eval()
    sparse = any(isinstance(m, SparseGatedMLP) for m in model.modules())
    if sparse:
        for m in model.modules():
            if isinstance(m, SparseGatedMLP):
                m.reset_stats()
    else:
        hooks, counts = dense_zero_fraction_hooks(model)
    tot, n = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch]
        tot += float(lm_loss(model, w)) * w.shape[0]
        n += w.shape[0]
    if sparse:
        per_layer = [1.0 - s["density"] for s in ffn_sparsity_stats(model).values()]
    else:
        for h in hooks:
            h.remove()
        per_layer = [z / max(t, 1.0) for z, t in counts]
    model.train(was)
    return {"loss": tot / n, "sparsity_per_layer": per_layer, "sparsity_mean": sum(per_layer) / len(per_layer)}


def lr_at(step: int, args: argparse.Namespace) -> float:
    warm = max(1, int(0.05 * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    t = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def l1_at(step: int, args: argparse.Namespace) -> float:
    ramp = max(1, int(args.l1_warmup * args.steps))
    return args.l1 * min(1.0, (step + 1) / ramp)


@torch.no_grad()
def reinit_dead_units(model: LlamaForCausalLM, opt: torch.optim.Optimizer, recent: list[torch.Tensor],
                      threshold: float, gen: torch.Generator) -> list[int]:
    """Re-initialise the FFN units that fired on none of the ``recent`` batches (per layer): fresh
    ``gate_proj``/``up_proj`` rows (the model's init scale), a zero ``down_proj`` column (the model's
    function does not change) and fresh AdamW state for those entries. Returns the count per layer."""
    mlps = [m for m in model.modules() if isinstance(m, SparseGatedMLP)]
    fired = [torch.zeros(m.intermediate_size, dtype=torch.bool) for m in mlps]

    def mark(i: int) -> Any:
        def hook(mod: SparseGatedMLP, args: tuple) -> None:
            x = args[0].reshape(-1, mod.hidden_size)
            fired[i] |= (x @ mod.gate_proj.weight.t() > threshold).any(0)
        return hook

    hooks = [m.register_forward_pre_hook(mark(i)) for i, m in enumerate(mlps)]
    was = model.training
    model.eval()
    for win in recent:
        model(input_ids=win[:, :-1])
    model.train(was)
    for h in hooks:
        h.remove()
    std = model.config.initializer_range
    counts = []
    for m, f in zip(mlps, fired):
        dead = (~f).nonzero().flatten()
        counts.append(int(dead.numel()))
        if not dead.numel():
            continue
        for lin in (m.gate_proj, m.up_proj):
            lin.weight[dead] = torch.randn(int(dead.numel()), lin.weight.shape[1], generator=gen) * std
        m.down_proj.weight[:, dead] = 0.0
        for p, rows in ((m.gate_proj.weight, True), (m.up_proj.weight, True), (m.down_proj.weight, False)):
            st = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    if rows:
                        st[key][dead] = 0.0
                    else:
                        st[key][:, dead] = 0.0
    return counts


def train(model: LlamaForCausalLM, data: list[torch.Tensor], args: argparse.Namespace, *, l1: bool,
          heldout: torch.Tensor, label: str) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    model.train()
    times, log = [], []
    gen = torch.Generator().manual_seed(args.seed + 7)
    reinit_log: list[dict] = []
    t_start = time.perf_counter()
    for step, win in enumerate(data):
        if (l1 and args.reinit_every and step and step % args.reinit_every == 0
                and step <= args.reinit_until * len(data)):
            counts = reinit_dead_units(model, opt, data[max(0, step - args.reinit_window):step], args.threshold, gen)
            reinit_log.append({"step": step, "reinitialised_per_layer": counts})
            print(f"[{label}] " + json.dumps(reinit_log[-1]), file=sys.stderr, flush=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        t0 = time.perf_counter()
        ce = lm_loss(model, win)
        loss = ce + l1_at(step, args) * total_l1(model) if l1 else ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        if step % args.log_every == 0 or step == len(data) - 1:
            rec = {"step": step, "ce": float(ce.detach()), "step_s": times[-1]}
            if l1:
                dens = [float(m.last_density) for m in model.modules() if isinstance(m, SparseGatedMLP)]
                rec["l1_coef"] = l1_at(step, args)
                rec["sparsity_per_layer"] = [1.0 - d for d in dens]
            log.append(rec)
            elapsed = time.perf_counter() - t_start
            left = elapsed / (step + 1) * (len(data) - step - 1)
            print(f"[{label}] step {step + 1}/{len(data)}, {elapsed:.0f} s elapsed, about {left:.0f} s left "
                  + json.dumps(rec), file=sys.stderr, flush=True)
    tail = times[len(times) // 2:]  # the second half: the sparse model's sparsity has settled by then
    return {"log": log, "reinit_log": reinit_log, "step_s_median_second_half": statistics.median(tail),
            "step_s_median_all": statistics.median(times), "train_s": sum(times)}


@torch.no_grad()
def time_steps(model: LlamaForCausalLM, data: list[torch.Tensor], args: argparse.Namespace, l1: bool) -> float:
    """Median step time (forward + backward + AdamW step) on a throw-away copy, at the final weights."""
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-6)
    times = []
    for win in data:
        with torch.enable_grad():
            t0 = time.perf_counter()
            loss = lm_loss(m, win)
            if l1:
                loss = loss + args.l1 * total_l1(m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[2:] if len(times) > 4 else times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn-mult", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--l1", type=float, default=5e-4, help="final L1 coefficient (on the per-token L1, summed "
                    "over layers)")
    ap.add_argument("--l1-warmup", type=float, default=0.3, help="fraction of the steps over which coef ramps up")
    ap.add_argument("--threshold", type=float, default=0.1, help="gate values <= threshold are dropped (sparse)")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-train-bytes", type=int, default=4_000_000)
    ap.add_argument("--max-heldout-bytes", type=int, default=400_000)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--time-steps", type=int, default=12, help="extra steps timed at the final weights")
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--reinit-every", type=int, default=0, help="every N steps, re-initialise the FFN units of "
                    "the L1 model that fired on none of the last --reinit-window batches (0: never)")
    ap.add_argument("--reinit-window", type=int, default=50)
    ap.add_argument("--reinit-until", type=float, default=0.7, help="last re-initialisation at this fraction of "
                    "the steps")
    ap.add_argument("--save", type=str, default=None, help="directory: save the trained models there "
                    "(transformers save_pretrained, plain LlamaForCausalLM; sparse/ and dense/)")
    ap.add_argument("--dump-heldout", type=str, default=None, help="write the held-out text to this file and "
                    "stop (the text docs/analysis.md analyses)")
    ap.add_argument("--only", choices=("both", "sparse", "dense"), default="both")
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    import numba

    numba_threads = numba.get_num_threads()
    train_b, held_b, corpus = stdlib_corpus(args.max_train_bytes, args.max_heldout_bytes)
    if args.dump_heldout:
        Path(args.dump_heldout).write_bytes(held_b)
        return {"corpus": corpus, "heldout_file": args.dump_heldout}
    train_t = torch.frombuffer(bytearray(train_b), dtype=torch.uint8)
    held_t = torch.frombuffer(bytearray(held_b), dtype=torch.uint8)
    data = batches(train_t, args.steps, args.batch, args.seq, args.seed + 1)
    heldout = heldout_windows(held_t, args.eval_windows, args.seq)
    timing = data[:args.time_steps]

    base = build(args)
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "model": {"vocab": 256, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "ffn": args.ffn_mult * args.hidden, "params": sum(p.numel() for p in base.parameters())},
        "corpus": corpus,
        "threads": {"torch": torch.get_num_threads(), "numba": numba_threads,
                    "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "numba_threading_layer": None},
        "platform": {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
                     "cpu_count": os.cpu_count()},
    }
    init = evaluate(base, heldout, args.batch)
    result["initial_heldout_loss"] = init["loss"]

    if args.only in ("both", "dense"):
        dense = copy.deepcopy(base)
        tr = train(dense, data, args, l1=False, heldout=heldout, label="dense")
        ev = evaluate(dense, heldout, args.batch)
        result["dense"] = {**ev, **{k: v for k, v in tr.items() if k != "log"}, "log": tr["log"],
                           "step_s_final_weights": time_steps(dense, timing, args, l1=False),
                           **unit_stats(dense, heldout, args.batch)}
        if args.save:
            dense.save_pretrained(Path(args.save) / "dense")
    if args.only in ("both", "sparse"):
        sparse = patch_model(copy.deepcopy(base), ffn=dict(tile=args.tile, threshold=args.threshold))
        tr = train(sparse, data, args, l1=True, heldout=heldout, label="sparse")
        try:
            result["threads"]["numba_threading_layer"] = numba.threading_layer()
        except ValueError:
            pass
        ev = evaluate(sparse, heldout, args.batch)
        result["sparse"] = {**ev, **{k: v for k, v in tr.items() if k != "log"}, "log": tr["log"],
                            "step_s_final_weights": time_steps(sparse, timing, args, l1=True)}
        # the same trained weights through the plain transformers MLP (ReLU, dense matmuls): same function
        # when threshold == 0, so this isolates the cost of the sparse path at the reached sparsity
        unpatched = build(args)
        unpatched.load_state_dict(sparse.state_dict())
        result["sparse"]["step_s_final_weights_dense_path"] = time_steps(unpatched, timing, args, l1=False)
        ev_plain = evaluate(unpatched, heldout, args.batch)
        result["sparse"]["heldout_loss_dense_path"] = ev_plain["loss"]
        # plain ReLU (no gate threshold): the zeros the model makes without the threshold
        result["sparse"]["sparsity_per_layer_plain_relu"] = ev_plain["sparsity_per_layer"]
        result["sparse"].update(unit_stats(unpatched, heldout, args.batch))
        if args.save:
            unpatched.save_pretrained(Path(args.save) / "sparse")
        ffn = args.ffn_mult * args.hidden
        result["sparse"]["active_units_per_token_per_layer"] = [(1 - s) * ffn for s in ev["sparsity_per_layer"]]
    if "dense" in result and "sparse" in result:
        d, s = result["dense"], result["sparse"]
        result["summary"] = {
            "heldout_loss_dense": d["loss"], "heldout_loss_sparse": s["loss"],
            "relative_loss_increase": s["loss"] / d["loss"] - 1.0,
            "sparsity_per_layer_sparse": s["sparsity_per_layer"],
            "sparsity_per_layer_dense": d["sparsity_per_layer"],
            "step_s_sparse_path": s["step_s_median_second_half"],
            "step_s_dense_twin": d["step_s_median_second_half"],
            "heldout_loss_dense_twin_without_ffn": d["heldout_loss_without_ffn"],
            "dead_unit_fraction_per_layer_sparse": s["dead_unit_fraction_per_layer"],
            "target_met": bool(min(s["sparsity_per_layer"]) >= 0.99 and s["loss"] / d["loss"] - 1.0 <= 0.03),
        }
    text = json.dumps(result, indent=1)
    print(json.dumps(result.get("summary", result), indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
