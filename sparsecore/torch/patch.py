"""Put sparsecore's modules into a Hugging Face LLaMA-family model, in place."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .modules import (
    THRESHOLDS_FORMAT,
    SparseGatedMLP,
    ThresholdSparseMLP,
    _check_calibration,
    calibrate_thresholds,
    load_thresholds,
    save_thresholds,
)

__all__ = ["patch_model", "PatchReport", "calibrate_thresholds", "save_thresholds", "load_thresholds"]

_FFN_KEYS = ("mode", "tile", "capacity", "threshold", "act", "sparsity", "thresholds", "calibration",
             "input_sparsity")
_FFN_MODES = ("relu", "threshold")
_FFN_MODE_KEYS = {"relu": ("mode", "tile", "capacity", "threshold", "act"),
                  "threshold": ("mode", "tile", "capacity", "sparsity", "thresholds", "calibration",
                                "input_sparsity")}
_FFN_ACTS = ("relu",)
_DECODE_KEYS = ("k", "method", "sink", "window", "shared", "page_size", "top_p", "k_min", "rescore", "candidates",
                "tail_sample")


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
    return (not isinstance(m, (SparseGatedMLP, ThresholdSparseMLP))
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


def _threshold_options(model: nn.Module, opts: dict, names: list[str]) -> dict[str, dict]:
    """Per-MLP keyword arguments of :meth:`ThresholdSparseMLP.from_dense` for ``ffn=dict(mode="threshold",
    ...)``: the thresholds given (a :func:`calibrate_thresholds` result, a JSON file of one, or a plain
    ``{mlp name: threshold}`` dict), or calibrated here on ``calibration`` token ids for ``sparsity``, or all 0
    for ``sparsity=0``. Checks everything before anything changes."""
    sparsity = opts.get("sparsity")
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))
                                 or not 0.0 <= sparsity < 1.0):
        raise ValueError(f"patch_model: ffn sparsity = {sparsity!r}; must be a number in [0, 1)")
    given, calib = opts.get("thresholds"), opts.get("calibration")
    if given is not None and calib is not None:
        raise ValueError("patch_model: ffn has both thresholds and calibration; pass one (calibration ids are "
                         "used to compute thresholds)")
    if given is None:
        if sparsity is None:
            raise ValueError("patch_model: ffn mode='threshold' needs thresholds=... (from calibrate_thresholds, or "
                             "a JSON file that save_thresholds wrote), or sparsity=s with calibration=token ids "
                             "(or sparsity=0)")
        if calib is not None:
            given = calibrate_thresholds(model, calib, float(sparsity), input_sparsity=opts.get("input_sparsity"))
        elif sparsity == 0:
            given = {name: 0.0 for name in names}
        else:
            raise ValueError(f"patch_model: ffn sparsity = {sparsity} needs per-layer thresholds: pass "
                             "thresholds=calibrate_thresholds(model, ids, sparsity) (or a JSON file of them), or "
                             "calibration=token ids [N, T] of real text to calibrate here")
    elif isinstance(given, (str, os.PathLike)):
        given = load_thresholds(given)
    if isinstance(given, dict) and "format" in given:
        data = _check_calibration(given, "patch_model: ffn thresholds")
        if sparsity is not None and abs(float(data["sparsity"]) - float(sparsity)) > 1e-9:
            raise ValueError(f"patch_model: ffn sparsity = {sparsity} but the thresholds were calibrated for "
                             f"sparsity = {data['sparsity']}; drop sparsity or calibrate again")
        sparsity = float(data["sparsity"])
        table = data["thresholds"]
        in_table = data.get("input_thresholds")
        in_sparsity = data.get("input_sparsity")
    elif isinstance(given, dict):
        table = _check_calibration({"format": THRESHOLDS_FORMAT, "thresholds": given},
                                   "patch_model: ffn thresholds")["thresholds"]
    else:
        raise TypeError(f"patch_model: ffn thresholds = {type(given).__name__}; expected a calibrate_thresholds "
                        "result, a path to its JSON, or a dict {mlp module name: threshold}")
    missing = [n for n in names if n not in table]
    extra = sorted(set(table) - set(names))
    if missing or extra:
        raise ValueError(f"patch_model: ffn thresholds do not match the model's MLPs: missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''} ({len(missing)}), unknown {extra[:3]}"
                         f"{'...' if len(extra) > 3 else ''} ({len(extra)}); calibrate on this model")
    want_in = opts.get("input_sparsity")
    if want_in is not None:
        if not isinstance(given, dict) or "format" not in given or in_table is None:
            raise ValueError(f"patch_model: ffn input_sparsity = {want_in!r} needs input thresholds: pass "
                             "calibration=token ids, or thresholds=calibrate_thresholds(model, ids, sparsity, "
                             "input_sparsity=...)")
        if abs(float(in_sparsity) - float(want_in)) > 1e-9:
            raise ValueError(f"patch_model: ffn input_sparsity = {want_in} but the thresholds were calibrated for "
                             f"input_sparsity = {in_sparsity}; drop input_sparsity or calibrate again")
    elif not isinstance(given, dict) or "format" not in given:
        in_table = None
    kw = {k: opts[k] for k in ("tile", "capacity") if k in opts}
    per_layer = {n: dict(threshold=float(table[n]), expected_sparsity=sparsity, **kw) for n in names}
    if in_table is not None:  # calibrated with input sparsity: used whenever present
        for n in names:
            per_layer[n].update(input_threshold=float(in_table[n]), expected_input_sparsity=in_sparsity)
    # construct nothing yet, but check the packing options once (the same for every layer)
    probe = dict(per_layer[names[0]]) if names else {}
    if probe:
        mlp = dict(model.named_modules())[names[0]]
        ThresholdSparseMLP.from_dense(mlp, **probe)
    return per_layer


def patch_model(model: nn.Module, ffn: bool | dict | None = None, decode: bool | dict | None = None
                ) -> nn.Module:
    """Make ``model`` (a Hugging Face LLaMA-family model) run on sparsecore's kernels, in place.

    ``ffn=True`` (or ``ffn=dict(tile=..., capacity=..., threshold=...)``) replaces every LLaMA-style
    MLP by a :class:`SparseGatedMLP` that shares its projections (no copy; the state dict keeps its
    keys). The sparse MLP gates with ReLU, so this keeps the model's function only when its
    ``hidden_act`` is ``"relu"``; on any other model it raises, unless ``ffn=dict(act="relu")`` says
    that the gate is to become ReLU (a model you will fine-tune; the config's ``hidden_act`` is then
    set to ``"relu"``).

    ``ffn=dict(mode="threshold", sparsity=s, thresholds=..., tile=256, capacity=None)`` is
    training-free sparsity for a model of any activation (SiLU included): every MLP becomes a
    :class:`~sparsecore.torch.modules.ThresholdSparseMLP` that keeps the model's activation and drops
    the hidden activations (the input of ``down_proj``) with ``|h| <= `` its layer's threshold, then
    multiplies the packed rest by ``down_proj`` with ``spmm``. ``thresholds`` is a
    :func:`~sparsecore.torch.modules.calibrate_thresholds` result (or the path of the JSON that
    :func:`~sparsecore.torch.modules.save_thresholds` wrote, or ``{mlp name: threshold}``); or pass
    ``calibration=`` token ids of real text to calibrate here for ``sparsity``; ``sparsity=0`` alone
    drops only exact zeros (the dense model's function). ``input_sparsity=s_in`` (with
    ``calibration=``, or thresholds calibrated with ``input_sparsity``) also drops the smallest
    fraction ``s_in`` of each MLP's input ``x`` as TEAL does, so that decode reads only the kept
    columns of ``gate_proj`` and ``up_proj`` (``spmm`` over the packed ``x``); thresholds calibrated
    with input sparsity apply it whenever they are given.

    ``decode=dict(k=..., method="exact"|"quest"|"int8", sink=0, window=0, shared=True,
    page_size=None, top_p=None, k_min=0, rescore=0, candidates=0, tail_sample=None)`` (``top_p``: the
    adaptive budget of :func:`sparsecore.select_topk`, ``k`` then the most keys; ``candidates``: the
    ``k`` kept ranked by attention mass among that many best by the shared ranking; as many as the
    cache can hold, e.g. ``model.config.max_position_embeddings``: every key, ranked by the mean of
    each query head's softmax, docs/selection.md's quality recommendation; ``method="int8"``: ranking over an
    int8 copy of the keys kept beside the cache, ``rescore`` candidates re-scored exactly) gives
    every attention layer a :class:`~sparsecore.torch.attention.TopKDecode` (the attribute
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
    threshold_mode = False
    if ffn_opts is not None:
        mode = ffn_opts.pop("mode", "relu")
        if mode not in _FFN_MODES:
            raise ValueError(f"patch_model: ffn mode = {mode!r}; allowed: {', '.join(map(repr, _FFN_MODES))}")
        wrong = sorted(set(ffn_opts) - set(_FFN_MODE_KEYS[mode]))
        if wrong:
            raise ValueError(f"patch_model: ffn keys {wrong} do not apply to mode = {mode!r}; allowed with it: "
                             f"{', '.join(_FFN_MODE_KEYS[mode])}")
        threshold_mode = mode == "threshold"
        if threshold_mode:
            ffn_per_layer = _threshold_options(model, ffn_opts, [full for _, _, full, _ in mlps])
        else:
            act = ffn_opts.pop("act", None)
            if act is not None and act not in _FFN_ACTS:
                raise ValueError(f"patch_model: ffn act = {act!r}; allowed: {', '.join(_FFN_ACTS)}")
            have = _hidden_act(model, [m for *_, m in mlps])
            if act is None and have != "relu":
                raise ValueError(
                    f"patch_model: hidden_act = {have!r}; ffn=True keeps a model's function only when hidden_act "
                    "is 'relu' (the sparse MLP gates with ReLU). Choices: a ReLU-gated model; "
                    "ffn=dict(mode='threshold', sparsity=s, thresholds=calibrate_thresholds(model, ids, s)) for "
                    "training-free sparsity that keeps the model's activation (the smallest hidden activations "
                    "are dropped; the outputs change a little, measured in docs/real_model.md); or "
                    "ffn=dict(act='relu') to replace the gate by ReLU knowingly (the model's outputs change: "
                    "fine-tune it afterwards)")
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
        if threshold_mode:
            new_mlp = ThresholdSparseMLP.from_dense(child, **ffn_per_layer[full])
        else:
            new_mlp = SparseGatedMLP.from_dense(child, **ffn_opts)
        setattr(parent, child_name, new_mlp)
        report["ffn"].append(full)
    if attn_name is not None:
        for (full, child), state in zip(attns, states):
            child.sparsecore_decode = state
            report["decode"].append(full)
        model.set_attn_implementation(attn_name)
    cfg = getattr(model, "config", None)
    if report["ffn"] and not threshold_mode and cfg is not None and hasattr(cfg, "hidden_act"):
        cfg.hidden_act = "relu"
    model.sparsecore_patch = report
    return model
