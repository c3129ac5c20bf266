"""Put sparsecore's modules into a Hugging Face LLaMA-family model, in place."""

from __future__ import annotations

from typing import Any

from torch import nn

from .modules import SparseGatedMLP, TopKDecodeAttention

__all__ = ["patch_model", "PatchReport"]

_FFN_KEYS = ("tile", "capacity", "threshold")
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
    return (not isinstance(m, TopKDecodeAttention) and hasattr(m, "layer_idx") and hasattr(m, "head_dim")
            and all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")))


def patch_model(model: nn.Module, ffn: bool | dict | None = None, decode: bool | dict | None = None
                ) -> nn.Module:
    """Replace, in place, every LLaMA-style MLP of ``model`` by a :class:`SparseGatedMLP` (``ffn=True``
    or ``ffn=dict(tile=..., capacity=..., threshold=...)``) and every attention layer by a
    :class:`TopKDecodeAttention` (``decode=dict(k=..., method="exact"|"quest", sink=..., window=...,
    shared=True, page_size=None)``). Parameters are shared, not copied, so the state dict keeps its
    keys and ``model.generate`` works as before.

    The sparse MLP gates with ReLU: the outputs are unchanged only for a model trained with
    ``hidden_act="relu"`` (the config's ``hidden_act`` is set to ``"relu"`` to say so). Returns
    ``model``; ``model.sparsecore_patch`` is a :class:`PatchReport` with the names of the replaced
    modules.
    """
    ffn_opts = _options("ffn", ffn, _FFN_KEYS)
    dec_opts = _options("decode", decode, _DECODE_KEYS, required=("k",))
    if ffn_opts is None and dec_opts is None:
        raise ValueError("patch_model: nothing to do; pass ffn=True (or a dict) and/or decode=dict(k=...)")
    report = PatchReport(ffn=[], decode=[])
    targets = []
    for name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if ffn_opts is not None and _is_llama_mlp(child):
                targets.append((parent, child_name, full, "ffn", child))
            elif dec_opts is not None and _is_llama_attention(child):
                targets.append((parent, child_name, full, "decode", child))
    for parent, child_name, full, what, child in targets:
        if what == "ffn":
            new: nn.Module = SparseGatedMLP.from_dense(child, **ffn_opts)
        else:
            new = TopKDecodeAttention(child, **dec_opts)
        setattr(parent, child_name, new)
        report[what].append(full)
    for what, opts in (("ffn", ffn_opts), ("decode", dec_opts)):
        if opts is not None and not report[what]:
            kind = "MLP (gate_proj/up_proj/down_proj)" if what == "ffn" else "attention layer (q/k/v/o_proj)"
            raise ValueError(f"patch_model: {what} was requested but {type(model).__name__} has no LLaMA-style {kind}")
    cfg = getattr(model, "config", None)
    if report["ffn"] and cfg is not None and hasattr(cfg, "hidden_act"):
        cfg.hidden_act = "relu"
    model.sparsecore_patch = report
    return model
