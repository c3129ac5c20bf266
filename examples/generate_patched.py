"""Greedy generation speed of a LLaMA-style model, dense vs patched by sparsecore.

The model is built from a config with random weights (nothing is downloaded), so its attention is not
as peaked and its ReLU gate not as sparse as a trained model's: ``--density`` sets the FFN gate's
threshold so that about that fraction of the hidden units fire (what an L1-trained model gives), and
``--qk-scale`` sharpens the attention. Both runs use the same weights and the same prompt; the
dense run is the unpatched model (ReLU MLP, the original attention).

    NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 python examples/generate_patched.py --context 2048 --k 64

Prints prefill time, decode tokens/s for both, and how many generated tokens agree (with a gate
threshold the patched model is a different model, so its tokens differ). On a small CPU, pin both
thread pools as above: numba's OpenMP pool and torch's spin on the same cores and can slow both
models several-fold, whichever runs.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from sparsecore import models
from sparsecore.torch.attention import topk_decode_layers
from sparsecore.torch.modules import SparseGatedMLP
from sparsecore.torch.patch import patch_model


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.context + args.new_tokens + 8,
                      hidden_act="relu")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(args.qk_scale)
            layer.self_attn.k_proj.weight.mul_(args.qk_scale)
    return model


def gate_threshold(model: LlamaForCausalLM, ids: torch.Tensor, density: float) -> float:
    """The gate activation above which a ``density`` fraction of hidden units fire on the prompt."""
    acts = []
    hooks = [layer.mlp.gate_proj.register_forward_hook(lambda m, i, o: acts.append(o.detach().reshape(-1)))
             for layer in model.model.layers]
    with torch.no_grad():
        model(ids[:, :256])
    for h in hooks:
        h.remove()
    return float(torch.quantile(torch.cat(acts)[:1_000_000], 1 - density))


def timed_generate(model: LlamaForCausalLM, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, float, float]:
    """(tokens, prefill seconds, decode tokens/s): one prefill, then n - 1 one-token steps."""
    with torch.no_grad():
        cache = models.cache_kwargs(model, DynamicCache())
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, **cache)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        toks = [tok]
        for _ in range(n - 1):
            tok = model(tok, use_cache=True, **cache).logits[:, -1].argmax(-1, keepdim=True)
            toks.append(tok)
        t2 = time.perf_counter()
    return torch.cat(toks, 1), t1 - t0, (n - 1) * ids.shape[0] / (t2 - t1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--k", type=int, default=64, help="keys (exact) or pages (quest) chosen per step")
    p.add_argument("--method", choices=("exact", "quest"), default="exact")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--per-head", action="store_true", help="select per query head instead of per KV group")
    p.add_argument("--density", type=float, default=0.02,
                   help="fraction of FFN hidden units that fire; 0: no FFN patch")
    p.add_argument("--qk-scale", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeat", type=int, default=2, help="runs per model; the best is reported")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dense = build(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.context), generator=torch.Generator().manual_seed(1))
    patched = copy.deepcopy(dense)
    ffn = None
    if args.density > 0:
        ffn = dict(threshold=max(gate_threshold(dense, ids, args.density), 0.0))
    patch_model(patched, ffn=ffn, decode=dict(k=args.k, method=args.method, sink=args.sink, window=args.window,
                                              shared=not args.per_head))

    timed_generate(patched, ids[:, :64], 3)  # warm up the numba kernels
    rows: dict[str, tuple[torch.Tensor, float, float]] = {}
    for _ in range(args.repeat):  # interleaved, so that a busy machine slows both alike; best run kept
        for name, model in (("dense", dense), ("patched", patched)):
            r = timed_generate(model, ids, args.new_tokens)
            if name not in rows or r[2] > rows[name][2]:
                rows[name] = r
    attn = next(iter(topk_decode_layers(patched).values()))
    mlps = [m for m in patched.modules() if isinstance(m, SparseGatedMLP)]
    print(f"model: hidden {args.hidden}, ffn {args.intermediate}, {args.layers} layers, heads {args.heads}/"
          f"{args.kv_heads}, batch {args.batch}, context {args.context}, {args.new_tokens} new tokens, "
          f"torch threads {torch.get_num_threads()}")
    print(f"patch: decode k={args.k} {args.method} sink={args.sink} window={args.window}, keys read "
          f"{attn.read_fraction:.1%}; ffn " + (f"threshold {ffn['threshold']:.3g}, density "
                                             f"{sum(float(m.density) for m in mlps) / len(mlps):.2%}"
                                             if ffn else "dense"))
    for name, (_, prefill, tps) in rows.items():
        print(f"{name:8s} prefill {prefill:7.3f} s   decode {tps:8.1f} tokens/s")
    agree = float((rows["dense"][0] == rows["patched"][0]).float().mean())
    print(f"speedup {rows['patched'][2] / rows['dense'][2]:.2f}x; generated tokens equal to dense: {agree:.0%}")


if __name__ == "__main__":
    main()
