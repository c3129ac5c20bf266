"""``python -m sparsecore analyze``: s-Trace, computation density and the compressed-sensing probe of one or
two LLaMA-family causal LMs on a text file; JSON and PNG plots into ``--out``.

Models are ``transformers`` directories (``save_pretrained``), loaded offline; ``--random`` builds a tiny
random byte-level LLaMA instead (a smoke run). A model directory with a tokenizer is read with
``AutoTokenizer``; without one the text's bytes are the token ids (byte-level models, vocab >= 256).

Writes ``density.json`` (:func:`sparsecore.analysis.density.density_study`), ``probe.json`` (synthetic
recovery, recovery versus m on the first model, and per probed input the recovered units, the execution
plan built from them and its output error and times), ``summary.json`` and the figures. Progress goes to
stderr, one line per traced input and per probed input; stdout gets a short summary and the files written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter] = argparse.ArgumentDefaultsHelpFormatter) -> None:
    a = sub.add_parser("analyze", formatter_class=formatter, description=__doc__,
                       help="s-Trace, computation density and the compressed-sensing probe of a model on a text "
                            "file (JSON + plots)")
    a.add_argument("text", nargs="?", default=None, help="a text file (UTF-8 or bytes); not with --model smollm2")
    a.add_argument("--model", action="append", default=[], help="a transformers model directory (repeat for a "
                   "second model: cross-model correlation), or 'smollm2': the real SmolLM2-135M on real English "
                   "and Python text (sparsecore.models), with the byte-level model of --second-model as the "
                   "second model (docs/analysis.md)")
    a.add_argument("--second-model", default="auto", help="with --model smollm2: the second model's directory "
                   "(a byte-level model; 'auto': the repository's perf/results/cpu-amd-epyc-2core/models/l1_seed0 "
                   "when present; 'none' for none)")
    a.add_argument("--random", action="store_true", help="use a tiny random byte-level LLaMA (two seeds) instead")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--inputs", type=int, default=None, help="number of evenly spaced windows of the text "
                   "(default 32; smollm2: 128)")
    a.add_argument("--length", type=int, default=None, help="tokens per window (default 128; smollm2: 64)")
    a.add_argument("--context-lengths", default=None, help="comma-separated; <= --length (default 16,32,64,128; "
                   "smollm2: length/4, length/2, length)")
    a.add_argument("--key", choices=("flow", "local"), default="flow", help="s-Trace heap key")
    a.add_argument("--probe-inputs", type=int, default=None, help="windows probed with the compressed-sensing "
                   "probe (default 4)")
    a.add_argument("--probe-m", default="16,32,64,128,256", help="measurement counts for recovery versus m")
    a.add_argument("--probe-plan-m", type=int, default=None, help="measurements of the probe behind each "
                   "execution plan (fewer than the number of units: the compressed-sensing regime; default 64, "
                   "smollm2: 96)")
    a.add_argument("--probe-keep", type=float, default=0.9, help="execution plan: keep per unit kind the fewest "
                   "units holding this share of |x|")
    a.add_argument("--probe-delta", type=float, default=1e-3, help="gate perturbation size")
    a.add_argument("--probe-scheme", choices=("central", "forward"), default="central",
                   help="central differences (two forwards per measurement, second-order terms cancel) or forward")
    a.add_argument("--ffn-block", type=int, default=None, help="FFN channels per probe gate (default 64; "
                   "smollm2: 128)")
    a.add_argument("--synthetic-p", type=int, default=256, help="synthetic recovery: signal length")
    a.add_argument("--synthetic-k", type=int, default=8, help="synthetic recovery: non-zeros of the signal")
    a.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a.add_argument("--seed", type=int, default=0, help="seed of the random controls and the probe")
    a.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


_DEFAULT_SECOND = (Path(__file__).resolve().parents[2] / "perf" / "results" / "cpu-amd-epyc-2core" / "models"
                   / "l1_seed0")


def _ints(s: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"analyze: --{name} must be comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise SystemExit(f"analyze: --{name} must list positive integers, got {s!r}")
    return vals


def random_model(seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act="relu", max_position_embeddings=512)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return m.eval()


def load(path: str) -> tuple[Any, Any]:
    """(model in eval mode, float32; tokenizer or None) from a transformers directory, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise SystemExit(f"analyze: --model {path!r} is not a transformers model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype="float32").eval()
    tok = None
    if any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    return model, tok


def token_ids(data: bytes, tok: Any, vocab: int) -> np.ndarray:
    if tok is not None:
        return np.asarray(tok(data.decode("utf-8", errors="replace"))["input_ids"], dtype=np.int64)
    if vocab < 256:
        raise SystemExit(f"analyze: the model has no tokenizer and a vocabulary of {vocab} < 256, so the text's "
                         "bytes cannot be its tokens")
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


@contextlib.contextmanager
def _on_trace(module: Any, on_call: Callable[[Any], None]) -> Iterator[None]:
    """Call ``on_call(input_ids)`` before each ``module.trace_input`` while the block runs (the density
    study's per-input progress; ``density_study`` takes no progress callback), then restore it."""
    original = module.trace_input

    def traced(model: Any, input_ids: Any, *a: Any, **k: Any) -> Any:
        on_call(input_ids)
        return original(model, input_ids, *a, **k)

    module.trace_input = traced
    try:
        yield
    finally:
        module.trace_input = original


def short_summary(summary: dict[str, Any], files: list[Path]) -> list[str]:
    """A few lines for the terminal; the full results are in the JSON files."""
    lines = [f"analyze: {len(summary['models'])} model(s), {summary['inputs']} inputs of {summary['length']} tokens"]
    for name, d in summary["density"].items():
        q = d.get("quantiles", {})
        corr = summary["correlations"][name]["density_entropy"]
        lines.append(f"  {name}: computation density mean {d['mean']:.4g}, median {q.get('0.5', float('nan')):.4g} "
                     f"(n {d['n']}); density vs entropy rho {_num(corr.get('rho'))}, p {_num(corr.get('p'))}")
    for c in summary.get("cross_model") or []:
        lines.append(f"  cross-model density rho {_num(c.get('rho'))}, p {_num(c.get('p'))} ({c['a']} vs {c['b']})")
    for i, p in enumerate(summary.get("plans", [])):
        lines.append(f"  plan {i}: tv {_num(p.get('tv'))}, top1 {p.get('top1')}, time plan/full "
                     f"{_num(p.get('time_plan_s'))}/{_num(p.get('time_full_s'))} s")
    lines += [f"wrote {f}" for f in files]
    return lines


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def main(args: argparse.Namespace) -> int:
    # numba's OpenMP workers busy-wait after each parallel kernel and steal the cores from torch, which
    # distorts the execution-plan timings several-fold on small machines (docs/analysis.md); must be set
    # before torch and numba load their OpenMP runtimes
    if "torch" not in sys.modules and "numba" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.model == ["smollm2"]:
        if args.random:
            raise SystemExit("analyze: --model smollm2 takes no --random")
        from .real import main as real_main

        return real_main(args)
    if args.text is None:
        raise SystemExit("analyze: a text file is needed (only --model smollm2 brings its own text)")
    for name, default in (("inputs", 32), ("length", 128), ("context_lengths", "16,32,64,128"), ("probe_inputs", 4),
                          ("probe_plan_m", 64), ("ffn_block", 64)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    import torch

    from .density import density_study
    from .plan import ExecutionPlan, run_plan
    from .plots import plot_all
    from .plots_probe import plot_model_recovery, plot_probe_vs_truth, plot_synthetic_recovery
    from .probe import probe_model, recovery_vs_m, synthetic_recovery

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.text).read_bytes()
    if args.random == bool(args.model):
        raise SystemExit("analyze: give either --model (once or twice) or --random")
    if len(args.model) > 2:
        raise SystemExit(f"analyze: at most two --model, got {len(args.model)}")
    if args.random:
        models = {"random_seed0": random_model(args.seed), "random_seed1": random_model(args.seed + 1)}
        toks: dict[str, Any] = {k: None for k in models}
    else:
        models, toks = {}, {}
        for i, path in enumerate(args.model):
            name = f"{i}:{Path(path).name}"
            models[name], toks[name] = load(path)
    first = next(iter(models))
    ids = token_ids(data, toks[first], int(models[first].config.vocab_size))
    for name in models:
        if toks[name] is not None and toks[name].get_vocab() != (toks[first].get_vocab() if toks[first] else None):
            raise SystemExit("analyze: the two models tokenize differently; compare models with one tokenizer")
    ctx = [c for c in _ints(args.context_lengths, "context-lengths") if c <= args.length]
    need = args.length + args.inputs
    if ids.size < need:
        raise SystemExit(f"analyze: {args.text} has {ids.size} tokens; --inputs {args.inputs} windows of --length "
                         f"{args.length} need at least {need}")
    starts = np.round(np.linspace(0, ids.size - args.length, args.inputs)).astype(np.int64)
    windows = torch.from_numpy(np.stack([ids[s:s + args.length] for s in starts]))
    counts = np.bincount(ids, minlength=int(models[first].config.vocab_size)).astype(np.float64)

    from .._progress import Progress
    from . import density as density_module

    show = not getattr(args, "no_progress", False)
    p = Progress(len(models) * args.inputs, "analyze: density study", enabled=show)

    def on_trace(input_ids: Any) -> None:
        if int(input_ids.shape[-1]) == args.length:  # a full window starts; shorter contexts follow it
            model_i = p.i // args.inputs
            p.step(f"model {model_i + 1}/{len(models)}, input {p.i % args.inputs + 1}/{args.inputs}")

    with _on_trace(density_module, on_trace):
        study = density_study(models, windows, corpus_counts=counts, context_lengths=ctx, key=args.key,
                              seed=args.seed)
    p.done(f"{len(models)} model(s) x {args.inputs} inputs")
    (out / "density.json").write_text(json.dumps(study, indent=1) + "\n")
    figures = {k: str(v) for k, v in plot_all(study, out).items()}

    probe: dict[str, Any] = {"synthetic": synthetic_recovery(args.synthetic_p, args.synthetic_k,
                                                             _ints(args.probe_m, "probe-m"), trials=20,
                                                             seed=args.seed, solver="all")}
    figures["synthetic_recovery"] = str(plot_synthetic_recovery(probe["synthetic"], out / "probe_synthetic.png"))
    model = models[first]
    n_probe = min(args.probe_inputs, args.inputs)
    pp = Progress(n_probe + 1, "analyze: probe", enabled=show and n_probe > 0)
    if n_probe:
        ms = _ints(args.probe_m, "probe-m")
        pp.step("recovery versus m")
        probe["recovery_vs_m"] = recovery_vs_m(model, windows[0], ms, ffn_block_size=args.ffn_block, seeds=(0, 1),
                                                delta=args.probe_delta, scheme=args.probe_scheme)
        figures["probe_recovery"] = str(plot_model_recovery(probe["recovery_vs_m"], out / "probe_recovery.png"))
        probe["inputs"] = []
        for j in range(n_probe):
            w = windows[int(j * (args.inputs // n_probe))]
            pp.step(f"input {j + 1}/{n_probe}")
            res = probe_model(model, w, m=args.probe_plan_m, ffn_block_size=args.ffn_block, seed=args.seed + j,
                              delta=args.probe_delta, scheme=args.probe_scheme)
            plan = ExecutionPlan.from_probe(res, mass=args.probe_keep)
            probe["inputs"].append({"probe": res.to_json(), "plan": plan.to_json(), "run": run_plan(model, w, plan)})
            if j == 0:
                figures["probe_vs_truth"] = str(plot_probe_vs_truth(res, out / "probe_vs_truth.png"))
    pp.done(f"{n_probe} input(s)")
    (out / "probe.json").write_text(json.dumps(probe, indent=1, default=_json_default) + "\n")

    summary = {"models": list(models), "inputs": args.inputs, "length": args.length, "figures": figures,
               "density": {k: v["density"] for k, v in study["models"].items()},
               "correlations": {k: v["correlations"] for k, v in study["models"].items()},
               "cross_model": study.get("cross_model"),
               "plans": [{k: p["run"][k] for k in ("tv", "top1", "time_hf_s", "time_full_s", "time_plan_s")
                          if k in p["run"]} | {"kept": p["plan"].get("fractions")} for p in probe.get("inputs", [])]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    files = [out / "density.json", out / "probe.json", out / "summary.json"] + [Path(f) for f in figures.values()]
    print("\n".join(short_summary(json.loads(json.dumps(summary, default=_json_default)), files)))
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")
