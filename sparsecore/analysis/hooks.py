"""Forward hooks that record and intervene on a LLaMA-family causal LM, one forward at a time.

Everything in :mod:`sparsecore.analysis` runs the model through :class:`Tracer`: a context manager that
installs, on any ``transformers`` causal LM whose decoder layers have ``self_attn`` (``q/k/v/o_proj``),
``post_attention_layernorm`` and ``mlp`` (LLaMA, Mistral, Qwen2, ...):

- an attention function registered with transformers' ``AttentionInterface`` (the library's own
  extension point for attention; a forward hook cannot reach the post-softmax weights): eager attention
  in float32 that records each head's weights and the norms of its projected value vectors, and applies
  the edge, head and token multipliers of an :class:`Intervention`;
- forward (pre-)hooks on each decoder layer, its ``self_attn``, ``post_attention_layernorm`` and ``mlp``
  (and ``mlp.down_proj`` for FFN channel gates) that record the residual stream and the MLP output and
  apply the MLP and residual multipliers.

The residual stream of a model with ``L`` layers has ``2L + 1`` states per token: ``R[0]`` (embeddings),
``R[2i+1] = R[2i] + attn_i(R[2i])`` and ``R[2i+2] = R[2i+1] + mlp_i(R[2i+1])``. An intervention multiplies,
per batch row (so that many subgraphs run in one batched forward)::

    attn[i, b, h, t, s]  the attention weight of head h, target t, source s (after softmax, no renormalisation)
    token[b, s]          every attention weight towards source token s, in every layer and head
    head[i, b, h]        head h's output (before o_proj)
    mlp[i, b, t]         the MLP's output at token t
    resid[k, b, t]       the residual passthrough R[k, t] -> R[k+1, t] (k = 2i: around attention, 2i+1: around the MLP)
    ffn_block[i, b, j]   FFN hidden channels j*ffn_block_size ... (j+1)*ffn_block_size - 1 (input of down_proj)

``None`` means 1 everywhere, and a forward with every multiplier 1 gives bit-identical logits to one with
none (``x * 1 == x`` and ``x + 0 * y == x`` for finite floats).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._checks import fail

ATTN_NAME = "sparsecore_trace"


@dataclass
class Intervention:
    """Multipliers for one batched forward (see the module docstring for the shapes; ``None`` = all ones)."""

    attn: torch.Tensor | None = None
    token: torch.Tensor | None = None
    head: torch.Tensor | None = None
    mlp: torch.Tensor | None = None
    resid: torch.Tensor | None = None
    ffn_block: torch.Tensor | None = None
    ffn_block_size: int = 64


@dataclass
class Record:
    """What one traced forward saw, per layer ``i`` (float32, detached, batch rows kept)."""

    probs: list[torch.Tensor] = field(default_factory=list)        # [B, H, T, S] post-softmax, before interventions
    value_norm: list[torch.Tensor] = field(default_factory=list)   # [B, H, S] ||W_O[:, head h] v[s]||
    resid_in: list[torch.Tensor] = field(default_factory=list)     # [B, T, d] R[2i]
    resid_mid: list[torch.Tensor] = field(default_factory=list)    # [B, T, d] R[2i+1]
    mlp_out: list[torch.Tensor] = field(default_factory=list)      # [B, T, d] mlp_i(R[2i+1]) before interventions


def layers_of(model: Any) -> Any:
    """The decoder layers of a transformers causal LM (``model.model.layers``), checked for the LLaMA layout."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or len(layers) == 0:
        fail("Tracer", "model: expected a transformers causal LM with .model.layers (LLaMA family), "
             f"got {type(model).__name__}")
    for i, layer in enumerate(layers):
        for name in ("self_attn", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, name):
                fail("Tracer", f"model: decoder layer {i} ({type(layer).__name__}) has no .{name}; only LLaMA-family "
                     "layers "
                     "(self_attn with q/k/v/o_proj, post_attention_layernorm, mlp) can be traced")
        if not hasattr(layer.self_attn, "o_proj"):
            fail("Tracer", f"model: layer {i}'s self_attn has no o_proj")
    return layers


def model_dims(model: Any) -> dict[str, int]:
    layers = layers_of(model)
    attn = layers[0].self_attn
    cfg = model.config
    n_heads = int(cfg.num_attention_heads)
    return {"layers": len(layers), "heads": n_heads, "kv_heads": int(getattr(cfg, "num_key_value_heads", n_heads)),
            "head_dim": int(getattr(attn, "head_dim", cfg.hidden_size // n_heads)), "hidden": int(cfg.hidden_size),
            "ffn": int(getattr(cfg, "intermediate_size", 0))}


class Tracer:
    """``with Tracer(model) as tr: tr.run(ids, intervention)``: a traced forward; see the module docstring."""

    _registered = False

    def __init__(self, model: Any, *, record: bool = True) -> None:
        self.model = model
        self.layers = layers_of(model)
        self.dims = model_dims(model)
        self.record_enabled = record
        self.iv: Intervention | None = None
        self.rec = Record()
        self._handles: list[Any] = []
        self._saved_impl: str | None = None
        self._x_in: list[torch.Tensor | None] = [None] * len(self.layers)
        self._x_mid: list[torch.Tensor | None] = [None] * len(self.layers)

    # --- installation ---------------------------------------------------------------------------------------
    @classmethod
    def _register(cls) -> None:
        if cls._registered:
            return
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        AttentionInterface.register(ATTN_NAME, _traced_attention)
        AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
        cls._registered = True

    def __enter__(self) -> Tracer:
        self._register()
        self._saved_impl = getattr(self.model.config, "_attn_implementation", None)
        self.model.set_attn_implementation(ATTN_NAME)
        for i, layer in enumerate(self.layers):
            layer.self_attn._sparsecore_tracer = (self, i)
            self._handles += [
                layer.register_forward_pre_hook(self._layer_pre(i), with_kwargs=True),
                layer.self_attn.register_forward_hook(self._attn_post(i)),
                layer.post_attention_layernorm.register_forward_pre_hook(self._mid_pre(i)),
                layer.mlp.register_forward_hook(self._mlp_post(i)),
            ]
            down = getattr(layer.mlp, "down_proj", None)
            if down is not None:
                self._handles.append(down.register_forward_pre_hook(self._down_pre(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self.layers:
            if hasattr(layer.self_attn, "_sparsecore_tracer"):
                del layer.self_attn._sparsecore_tracer
        if self._saved_impl is not None:
            self.model.set_attn_implementation(self._saved_impl)

    # --- running --------------------------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, iv: Intervention | None = None, *, last_only: bool = False
            ) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of one forward under ``iv`` (in ``torch.inference_mode``); the record
        is refreshed. ``last_only=True``: the LM head runs on the last position only (logits [B, 1, vocab];
        on a large vocabulary that saves a fifth of the forward)."""
        with torch.inference_mode():
            return self.forward(input_ids, iv, last_only=last_only)

    def forward(self, input_ids: torch.Tensor, iv: Intervention | None = None, *, last_only: bool = False
                ) -> torch.Tensor:
        """:meth:`run` with autograd on: gradients flow to the multipliers of ``iv`` (and the weights)."""
        if input_ids.ndim != 2:
            fail("Tracer", f"input_ids: expected [batch, tokens], got shape {tuple(input_ids.shape)}")
        if iv is not None and iv.ffn_block is not None and not all(hasattr(l.mlp, "down_proj") for l in self.layers):
            fail("Tracer", "intervention.ffn_block: the model's MLPs have no down_proj to gate "
                 "(trace the unpatched model)")
        self.iv = iv
        self.rec = Record()
        try:
            kw = {"logits_to_keep": 1} if last_only else {}
            out = self.model(input_ids=input_ids, use_cache=False, **kw)
        finally:
            self.iv = None
        return out.logits.float()

    # --- hooks ----------------------------------------------------------------------------------------------
    def _layer_pre(self, i: int) -> Any:
        def hook(mod: Any, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            self._x_in[i] = x
            if self.record_enabled:
                self.rec.resid_in.append(x.detach().float())
        return hook

    def _attn_post(self, i: int) -> Any:
        def hook(mod: Any, args: Any, out: Any) -> Any:
            iv = self.iv
            if iv is None or iv.resid is None:
                return None
            y, w = out
            m = iv.resid[2 * i].to(y.dtype)[..., None]
            return (y + (m - 1) * self._x_in[i], w)
        return hook

    def _mid_pre(self, i: int) -> Any:
        def hook(mod: Any, args: tuple) -> None:
            self._x_mid[i] = args[0]
            if self.record_enabled:
                self.rec.resid_mid.append(args[0].detach().float())
        return hook

    def _mlp_post(self, i: int) -> Any:
        def hook(mod: Any, args: Any, out: torch.Tensor) -> Any:
            if self.record_enabled:
                self.rec.mlp_out.append(out.detach().float())
            iv = self.iv
            if iv is None or (iv.mlp is None and iv.resid is None):
                return None
            y = out
            if iv.mlp is not None:
                y = y * iv.mlp[i].to(y.dtype)[..., None]
            if iv.resid is not None:
                y = y + (iv.resid[2 * i + 1].to(y.dtype)[..., None] - 1) * self._x_mid[i]
            return y
        return hook

    def _down_pre(self, i: int) -> Any:
        def hook(mod: Any, args: tuple) -> Any:
            iv = self.iv
            if iv is None or iv.ffn_block is None:
                return None
            h = args[0]
            g = iv.ffn_block[i].to(h.dtype)                       # [B, nb]
            g = g.repeat_interleave(iv.ffn_block_size, dim=-1)[..., : h.shape[-1]]
            if g.shape[-1] != h.shape[-1]:
                fail("Tracer", f"intervention.ffn_block: {iv.ffn_block.shape[-1]} blocks of {iv.ffn_block_size} cover "
                     f"{g.shape[-1]} channels, the FFN has {h.shape[-1]}")
            return (h * g[:, None, :],)
        return hook


def _traced_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (float32) that records and applies the tracer's multipliers; [B, T, H, D] out."""
    tracer, i = getattr(module, "_sparsecore_tracer", (None, 0))
    b, h, t, d = query.shape
    groups = h // key.shape[1]
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else d ** -0.5
    scores = torch.matmul(query.float(), k.transpose(2, 3)) * scale
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : k.shape[-2]].float()
    probs = torch.softmax(scores, dim=-1)
    if tracer is not None:
        if tracer.record_enabled:
            w_o = module.o_proj.weight.float()                                      # [hidden, H*D]
            w_heads = w_o.view(w_o.shape[0], h, d).permute(1, 2, 0)                 # [H, D, hidden]
            vo = torch.einsum("bhsd,hde->bhse", v, w_heads)
            tracer.rec.probs.append(probs.detach())
            tracer.rec.value_norm.append(vo.norm(dim=-1).detach())
        iv = tracer.iv
        if iv is not None:
            if iv.attn is not None:
                probs = probs * iv.attn[i].float()
            if iv.token is not None:
                probs = probs * iv.token.float()[:, None, None, :]
    out = torch.matmul(probs, v)                                                    # [B, H, T, D]
    if tracer is not None and tracer.iv is not None and tracer.iv.head is not None:
        out = out * tracer.iv.head[i].float()[:, :, None, None]
    return out.transpose(1, 2).contiguous().to(query.dtype), probs
