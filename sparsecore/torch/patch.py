"""Put sparsecore's modules into a Hugging Face LLaMA-family model, in place."""

from __future__ import annotations

from typing import Any

from torch import nn

from .modules import SparseGatedMLP

__all__ = ["patch_model", "PatchReport"]

_FFN_KEYS = ("tile", "capacity", "threshold", "act")
_FFN_ACTS = ("relu",)
_DECODE_KEYS = ("k", "method", "sink", "window", "shared", "page_size")


class PatchReport(dict):
    """What :func:`patch_model` replaced: ``{"ffn": [module names], "decode": [module names]}``."""


def _options(where: str, value: Any, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict | None:
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(f"patch_model: {where} = {value!r}; expected True, False, None or a dict of "
                        f"{', '.join(allowed)}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"patch_model: {where} has unknown keys {unknown}; allowed: {', '.join(allowed)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise ValueError(f"patch_model: {where} needs {', '.join(missing)} (e.g. {where}=dict(k=64))")
    return dict(value)


def _is_llama_mlp(m: nn.Module) -> bool:
    return (not isinstance(m, SparseGatedMLP)
            and all(isinstance(getattr(m, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")))


def _is_llama_attention(m: nn.Module) -> bool:
    return (hasattr(m, "layer_idx") and hasattr(m, "head_dim")
            and all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")))


def _hidden_act(model: nn.Module, mlps: list[nn.Module]) -> str | None:
    """The MLPs' activation: the config's ``hidden_act``, else ``"relu"`` when every MLP's ``act_fn``
    is an ``nn.ReLU``."""
    act = getattr(getattr(model, "config", None), "hidden_act", None)
    if act is not None:
        return str(act)
    if mlps and all(isinstance(getattr(m, "act_fn", None), nn.ReLU) for m in mlps):
        return "relu"
    return None


def patch_model(model: nn.Module, ffn: bool | dict | None = None, decode: bool | dict | None = None
                ) -> nn.Module:
    """Make ``model`` (a Hugging Face LLaMA-family model) run on sparsecore's kernels, in place.

    ``ffn=True`` (or ``ffn=dict(tile=..., capacity=..., threshold=...)``) replaces every LLaMA-style
    MLP by a :class:`SparseGatedMLP` that shares its projections (no copy; the state dict keeps its
    keys). The sparse MLP gates with ReLU, so this keeps the model's function only when its
    ``hidden_act`` is ``"relu"``; on any other model it raises, unless ``ffn=dict(act="relu")`` says
    that the gate is to become ReLU (a model you will fine-tune; the config's ``hidden_act`` is then
    set to ``"relu"``).

    ``decode=dict(k=..., method="exact"|"quest", sink=0, window=0, shared=True, page_size=None)``
    gives every attention layer a :class:`~sparsecore.torch.attention.TopKDecode` (the attribute
    ``sparsecore_decode``) and switches the model to the attention function
    :func:`~sparsecore.torch.attention.register_attention` registered in transformers' attention
    registry over the implementation the model had (sdpa or eager): decode steps attend to the
    top-k keys, everything else runs the original implementation. The modules are not replaced.

    Returns ``model``; ``model.sparsecore_patch`` is a :class:`PatchReport` with the names of the
    patched modules.
    """
    ffn_opts = _options("ffn", ffn, _FFN_KEYS)
    dec_opts = _options("decode", decode, _DECODE_KEYS, required=("k",))
    if ffn_opts is None and dec_opts is None:
        raise ValueError("patch_model: nothing to do; pass ffn=True (or a dict) and/or decode=dict(k=...)")
    report = PatchReport(ffn=[], decode=[])
    mlps, attns = [], []
    for name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if ffn_opts is not None and _is_llama_mlp(child):
                mlps.append((parent, child_name, full, child))
            elif dec_opts is not None and _is_llama_attention(child):
                attns.append((full, child))
    for what, opts, found in (("ffn", ffn_opts, mlps), ("decode", dec_opts, attns)):
        if opts is not None and not found:
            kind = "MLP (gate_proj/up_proj/down_proj)" if what == "ffn" else "attention layer (q/k/v/o_proj)"
            raise ValueError(f"patch_model: {what} was requested but {type(model).__name__} has no LLaMA-style {kind}")
    if ffn_opts is not None:
        act = ffn_opts.pop("act", None)
        if act is not None and act not in _FFN_ACTS:
            raise ValueError(f"patch_model: ffn act = {act!r}; allowed: {', '.join(_FFN_ACTS)}")
        have = _hidden_act(model, [m for *_, m in mlps])
        if act is None and have != "relu":
            raise ValueError(
                f"patch_model: hidden_act = {have!r}; ffn=True keeps a model's function only when hidden_act is "
                "'relu' (the sparse MLP gates with ReLU). Choices: a ReLU-gated model; or ffn=dict(act='relu') to "
                "replace the gate by ReLU knowingly (the model's outputs change: fine-tune it afterwards)")
    attn_name = None
    if dec_opts is not None:
        from .attention import PREFIX, TopKDecode, register_attention

        cfg = getattr(model, "config", None)
        setter = getattr(model, "set_attn_implementation", None)
        if cfg is None or setter is None:
            raise TypeError(f"patch_model: decode needs a transformers PreTrainedModel (>= 5.0) with "
                            f"set_attn_implementation; got {type(model).__name__}")
        current = getattr(cfg, "_attn_implementation", None) or "eager"
        fallback = current.removeprefix(PREFIX) if current.startswith(PREFIX) else current
        attn_name = register_attention(fallback)
        states = [TopKDecode(**dec_opts) for _ in attns]  # all options checked before anything changes
    for parent, child_name, full, child in mlps:
        setattr(parent, child_name, SparseGatedMLP.from_dense(child, **ffn_opts))
        report["ffn"].append(full)
    if attn_name is not None:
        for (full, child), state in zip(attns, states):
            child.sparsecore_decode = state
            report["decode"].append(full)
        model.set_attn_implementation(attn_name)
    cfg = getattr(model, "config", None)
    if report["ffn"] and cfg is not None and hasattr(cfg, "hidden_act"):
        cfg.hidden_act = "relu"
    model.sparsecore_patch = report
    return model
