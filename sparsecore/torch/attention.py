"""Top-k decode attention for Hugging Face transformers, through its public attention registry.

transformers computes attention through a function looked up by name in ``AttentionInterface``
(``ALL_ATTENTION_FUNCTIONS``), selected by the model's attention implementation
(``model.set_attn_implementation(name)``), and builds masks through the matching entry of
``AttentionMaskInterface``. Each attention layer calls it after projecting, rotating and appending the
new keys to its cache::

    out, weights = fn(module, query [B, Hq, Sq, D], key [B, Hkv, Sk, D], value [B, Hkv, Sk, D],
                      attention_mask, scaling=..., dropout=..., **kwargs)   # out: [B, Sq, Hq, D]

:func:`register_attention` registers, for a fallback implementation (``"sdpa"``, ``"eager"``, ...),
the name ``"sparsecore_<fallback>"`` under both registries. The function reads the layer's
:class:`TopKDecode` (the attribute ``module.sparsecore_decode`` that :func:`sparsecore.torch.patch_model`
sets): a decode step (one query position, eval mode, no mask that hides a key other than a suffix)
selects keys with :func:`sparsecore.select_topk` and attends with :func:`sparsecore.sparse_decode`,
reading the cache in place; everything else (prefill, training, left padding, a layer without a
``TopKDecode``) runs the fallback unchanged, with the fallback's own masks. ``docs/decisions.md``
says why this hook and not a wrapper around the attention module.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import sparsecore as sc
from sparsecore._arrays import from_numpy, to_numpy

__all__ = ["TopKDecode", "register_attention", "topk_decode_layers", "PREFIX"]

PREFIX = "sparsecore_"
_METHODS = ("exact", "quest", "int8")
# keyword arguments of the registry call that change what attention means; a step that gets any of
# them with a value runs the fallback (sparse_decode computes plain softmax attention)
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


class TopKDecode:
    """One attention layer's top-k decode: its options, its Quest page bounds and its statistics.

    A decode step of the layer computes, over the first ``length`` cached positions::

        sel = sc.select_topk(q, kv, k, method=method, sink=sink, window=window, shared=shared)
        out = sc.sparse_decode(q, kv, sel, scale=scaling)

    ``k`` counts tokens (``"exact"``) or pages of ``page_size`` tokens (``"quest"``, default 16) chosen
    by score on top of the ``sink`` first and ``window`` last tokens; it is clamped to the cache.

    Statistics: ``decode_steps`` and ``dense_fallbacks`` (decode steps that ran the fallback because a
    mask hid keys, or because grad mode was on with inputs that require grad: the sparse step has no
    gradient, so such a step runs dense rather than drop one) are host counters; the keys read are
    counted on the host for host plans and on the device otherwise (no host synchronisation per step),
    and read on demand by ``keys_read`` and ``read_fraction``.

    Quest keeps the pages' key bounds (:func:`sparsecore.page_bounds`) between decode steps of the
    same cache: a step whose cache has one more position than the previous step's, with the same
    batch, heads and dtype, recomputes only the page of the new token; anything else (a prefill or
    another dense call of the layer, another shape, another length) builds them afresh. A cache
    reordered in place between steps (beam search) is not detected: use ``method="exact"`` there.
    """

    def __init__(self, *, k: int, method: str = "exact", sink: int = 0, window: int = 0, shared: bool = True,
                 page_size: int | None = None, top_p: float | None = None, k_min: int = 0, rescore: int = 0,
                 candidates: int = 0, tail_sample: int | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"TopKDecode: k = {k!r}; must be an int >= 0")
        if method not in _METHODS:
            raise ValueError(f"TopKDecode: method = {method!r}; allowed: {', '.join(_METHODS)}")
        for name, val in (("sink", sink), ("window", window)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"TopKDecode: {name} = {val!r}; must be an int >= 0")
        if page_size is not None and (isinstance(page_size, bool) or not isinstance(page_size, int)
                                      or page_size < 1):
            raise ValueError(f"TopKDecode: page_size = {page_size!r}; must be None or an int >= 1")
        if page_size is not None and method != "quest":
            raise ValueError(f"TopKDecode: page_size = {page_size} is for method='quest' only (method = {method!r})")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                                  or not 0 < top_p <= 1 or method not in ("exact", "int8")):
            raise ValueError(f"TopKDecode: top_p = {top_p!r}; must be None or a float in (0, 1], with method='exact' "
                             "or 'int8'")
        if isinstance(k_min, bool) or not isinstance(k_min, int) or not 0 <= k_min <= k \
                or (k_min and top_p is None):
            raise ValueError(f"TopKDecode: k_min = {k_min!r}; must be an int with 0 <= k_min <= k = {k}, used with "
                             "top_p only")
        if isinstance(rescore, bool) or not isinstance(rescore, int) or rescore < 0 \
                or (rescore and (method != "int8" or top_p is not None)):
            raise ValueError(f"TopKDecode: rescore = {rescore!r}; must be an int >= 0, used with method='int8' "
                             "without top_p only")
        if isinstance(candidates, bool) or not isinstance(candidates, int) or not (candidates == 0 or candidates >= k) \
                or (candidates and method not in ("exact", "int8")) or (candidates and rescore):
            raise ValueError(f"TopKDecode: candidates = {candidates!r}; must be 0 or an int >= k = {k}, with "
                             "method='exact' or 'int8' and no rescore (the units ranked by their attention mass)")
        self.top_p, self.k_min, self.rescore = (None if top_p is None else float(top_p)), k_min, rescore
        if tail_sample is not None and (isinstance(tail_sample, bool) or not isinstance(tail_sample, int)
                                        or tail_sample < 0 or not candidates):
            raise ValueError(f"TopKDecode: tail_sample = {tail_sample!r}; must be None or an int >= 0, with "
                             "candidates only")
        self.candidates, self.tail_sample = candidates, tail_sample
        self._codes: tuple[Any, tuple[int, ...], sc.KeyCodes] | None = None  # int8: (view, lengths, codes)
        self.k, self.method, self.sink, self.window = k, method, sink, window
        self.shared, self.page_size = bool(shared), page_size
        self.enabled = True
        self._plans: dict[Any, sc.DecodePlan] = {}
        self._last_plan: sc.DecodePlan | None = None
        self._bounds: tuple[Any, tuple[int, ...], sc.PageBounds] | None = None  # Quest: (view, lengths, bounds)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.decode_steps = 0
        self.dense_fallbacks = 0
        self.keys_total = 0
        self._keys_read: torch.Tensor | None = None  # counted on the device (GPU plans, compiled steps)
        self._keys_read_host = 0  # counted on the host (host plans)

    @property
    def keys_read(self) -> int:
        """Keys the sparse decode steps read (summed over sequences and selection groups)."""
        return self._keys_read_host + (0 if self._keys_read is None else int(self._keys_read))

    @property
    def read_fraction(self) -> float:
        """Fraction of the cached keys that the sparse decode steps read (1.0 before any)."""
        return self.keys_read / self.keys_total if self.keys_total else 1.0

    def options(self) -> dict[str, Any]:
        return dict(k=self.k, method=self.method, sink=self.sink, window=self.window, shared=self.shared,
                    page_size=self.page_size, top_p=self.top_p, k_min=self.k_min, rescore=self.rescore,
                    candidates=self.candidates, tail_sample=self.tail_sample)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"TopKDecode({opts}; decode_steps={self.decode_steps}, dense_fallbacks={self.dense_fallbacks})"

    # ------------------------------------------------------------------ the decode step

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               lengths: int | list[int] | tuple[int, ...], *, scaling: float | None = None) -> torch.Tensor:
        """Top-k decode attention of ``q[B, Hq, D]`` over the first ``lengths[b]`` positions of a
        ``[B, Hkv, S, D]`` cache (``lengths``: one int for every sequence, or one per sequence, host
        ints); returns ``[B, Hq, D]``.

        A contiguous cache is read as ``B * Hkv`` sequences of one KV head each (a reshape, no copy;
        the query heads of a group become that sequence's heads), which means the same for a
        selection shared per KV group or per head and keeps the kernels on contiguous rows; any other
        cache is read through the transposed view ``[B, S, Hkv, D]``."""
        b, hkv, s, d = keys.shape
        hq = q.shape[1]
        lens = (int(lengths),) * b if isinstance(lengths, int) else tuple(int(n) for n in lengths)
        if len(lens) != b or not all(1 <= n <= s for n in lens):
            raise ValueError(f"TopKDecode.attend: lengths = {lengths!r}; expected an int or {b} ints in [1, {s}]")
        rep = hkv if keys.is_contiguous() and values.is_contiguous() else 1
        seq_lens = tuple(n for n in lens for _ in range(rep))
        host = keys.is_cpu and not torch.compiler.is_compiling()
        if self.method == "int8" and keys.device.type not in ("cpu", "cuda"):
            raise NotImplementedError(
                f"TopKDecode: method='int8' keeps an int8 copy of the keys on the cache's device, CPU or CUDA; "
                f"this cache is on {keys.device}: use method='exact' (with candidates >= the context to rank "
                "every key by its attention mass)")
        if host:  # zero-copy NumPy views, made every step (kept, they would keep the cache alive after its
            # owner let it go): the plan runs on NumPy (no torch call per op, no views to check)
            keys, values, q = to_numpy(keys), to_numpy(values), to_numpy(q)
            kv_lens = np.array(seq_lens, np.int32)
        elif all(n == s for n in seq_lens):  # no mask: every key (no host-to-device copy)
            kv_lens = torch.full((len(seq_lens),), s, dtype=torch.int32, device=keys.device)
        else:
            kv_lens = torch.tensor(seq_lens, dtype=torch.int32).to(keys.device)
        kv = _dense_kv(keys, values, kv_lens, rep)
        if rep > 1:
            q = q.reshape(b * hkv, hq // hkv, d)
        opts: dict[str, Any] = dict(method=self.method, sink=self.sink, window=self.window, shared=self.shared)
        unit = (self.page_size or 16) if self.method == "quest" else 1
        k_eff = min(self.k, -(-s // unit))
        if self.top_p is not None:
            opts.update(top_p=self.top_p, k_min=min(self.k_min, k_eff))
        if self.candidates:  # as given: more than the cache holds is every key, one plan as the cache grows
            opts["candidates"] = self.candidates
            if self.tail_sample is not None:
                opts["tail_sample"] = self.tail_sample
        if self.method == "int8":
            r = min(self.rescore, s)
            opts["rescore"] = r if r > k_eff else 0
        if torch.compiler.is_compiling():
            # traced by torch.compile: the custom ops (with their fakes), Quest bounds built each step
            from . import ops as sct

            if self.method == "int8":
                raise NotImplementedError("TopKDecode: method='int8' runs eagerly only (no torch.compile "
                                          "custom op for it yet)")
            bounds = sct.page_bounds(kv, unit) if self.method == "quest" else None
            sel = sct.select_topk(q, kv, k_eff, bounds=bounds, **opts,
                                  **({"scale": scaling} if self.top_p is not None or self.candidates else {}))
            out, _ = sct.sparse_decode(q, kv, sel, scale=scaling)
            counts = sel.counts
        else:  # decode attention has no gradient: it runs in inference only (eval mode, one query)
            with torch.no_grad():
                bounds, start = self._quest_bounds(kv, unit, lens) if self.method == "quest" else (None, None)
                codes = self._key_codes(kv, lens) if self.method == "int8" else None
                out, _ = self._plan(q, kv, k_eff, bounds, scaling, opts, codes).run(q, kv, bounds=bounds,
                                                                                    update_from=start, codes=codes)
            counts = self._last_plan.last_counts
            if host:
                out = from_numpy(out, "torch")
        # keys read per (sequence, group) row: a page counts page_size keys, at most the length
        if isinstance(counts, np.ndarray):  # a host plan's launchers: counted on the host, in Python ints
            self._keys_read_host += sum(min(c * unit, n) for row, n in zip(counts.tolist(), seq_lens) for c in row)
        else:  # counted on the device, read on demand
            read = torch.minimum(counts.to(torch.int64) * unit, kv.lengths.to(torch.int64)[:, None]).sum()
            self._keys_read = read if self._keys_read is None else self._keys_read + read
        self.keys_total += int(counts.shape[1]) * rep * sum(lens)
        self.decode_steps += 1
        return out.reshape(b, hq, d)

    def _plan(self, q: torch.Tensor, kv: sc.DenseKV, k: int, bounds: sc.PageBounds | None, scaling: float | None,
              opts: dict[str, Any], codes: sc.KeyCodes | None = None) -> sc.DecodePlan:
        """The :class:`sparsecore.DecodePlan` of this step's shapes (made on the first step of a shape,
        kept for the next ones: the cache may grow, the plan follows it)."""
        # the dtype object itself (its str() cost 12 us a call); opts are built in one order every step
        key = (tuple(q.shape), q.dtype, _place(q), tuple(kv.k.shape[2:]), k, bounds is not None, scaling,
               tuple(opts.items()))
        found = self._plans.get(key)
        if found is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            found = self._plans[key] = sc.DecodePlan(q, kv, k, bounds=bounds, scale=scaling, codes=codes, **opts)
        self._last_plan = found
        return found

    def _quest_bounds(self, kv: sc.DenseKV, unit: int, lens: tuple[int, ...]) -> tuple[sc.PageBounds, Any]:
        """This step's Quest bounds and where their update starts: the previous step's bounds (grown
        if the cache outgrew them) with ``update_from`` the lengths before this step's token, for
        :meth:`DecodePlan.run` to update in the same call; or new bounds of the whole cache and None."""
        view = (tuple(kv.k.shape[:1]) + tuple(kv.k.shape[2:]), unit, str(kv.k.dtype), _place(kv.k))
        need = -(-int(kv.k.shape[1]) // unit)
        prev = self._bounds
        if prev is not None and prev[0] == view and len(prev[1]) == len(lens) \
                and all(n == p + 1 for n, p in zip(lens, prev[1])):
            bounds = prev[2]
            if bounds.num_pages < need:  # a growing (dynamic) cache: more pages, amortised doubling
                grown = sc.PageBounds(_zeros(bounds.kmin, (kv.batch, 2 * need) + bounds.kmin.shape[2:]),
                                      _zeros(bounds.kmax, (kv.batch, 2 * need) + bounds.kmax.shape[2:]), unit)
                grown.kmin[:, :bounds.num_pages] = bounds.kmin
                grown.kmax[:, :bounds.num_pages] = bounds.kmax
                bounds = grown
            start = kv.lengths - 1
        else:
            bounds, start = sc.page_bounds(kv, unit), None
        self._bounds = (view, lens, bounds)
        return bounds, start

    def _key_codes(self, kv: sc.DenseKV, lens: tuple[int, ...]) -> sc.KeyCodes:
        """The int8 copy of the keys (:func:`sparsecore.quantize_keys`), kept between decode steps like
        Quest's bounds: a step one position longer than the previous one quantises its new key only."""
        view = (tuple(kv.k.shape[:1]) + tuple(kv.k.shape[2:]), str(kv.k.dtype), _place(kv.k))
        prev = self._codes
        if prev is not None and prev[0] == view and len(prev[1]) == len(lens) \
                and all(n == p + 1 for n, p in zip(lens, prev[1])):
            codes = prev[2]
            if codes.max_len < kv.max_len:  # a growing (dynamic) cache: amortised doubling
                b, _, h, d = codes.codes.shape
                grown = sc.KeyCodes(_zeros(codes.codes, (b, 2 * kv.max_len, h, d)),
                                    _zeros(codes.scales, (b, 2 * kv.max_len, h)))
                grown.codes[:, :codes.max_len] = codes.codes
                grown.scales[:, :codes.max_len] = codes.scales
                codes = grown
            codes = sc.quantize_keys(kv, out=codes, start=kv.lengths - 1)
        else:
            codes = sc.quantize_keys(kv)
        self._codes = (view, lens, codes)
        return codes

    def forget_bounds(self) -> None:
        self._bounds = None
        self._codes = None


def _dense_kv(keys: Any, values: Any, lengths: Any, rep: int) -> sc.DenseKV:
    """A ``[B, Hkv, S, D]`` cache (NumPy or torch) as a DenseKV: ``B * Hkv`` sequences of one KV head
    when ``rep > 1`` (contiguous: a reshape), else the ``[B, S, Hkv, D]`` views (swapaxes)."""
    b, hkv, s, d = keys.shape
    if rep > 1:
        return sc.DenseKV(keys.reshape(b * hkv, s, 1, d), values.reshape(b * hkv, s, 1, d), lengths)
    return sc.DenseKV(keys.swapaxes(1, 2), values.swapaxes(1, 2), lengths)


def _place(a: Any) -> Any:
    """Where ``a`` lives: a torch tensor's device, ``"host"`` for a NumPy array."""
    return a.device if isinstance(a, torch.Tensor) else "host"


def _zeros(like: Any, shape: tuple[int, ...]) -> Any:
    """Zeros of ``like``'s kind, dtype and place."""
    return np.zeros(shape, like.dtype) if isinstance(like, np.ndarray) else like.new_zeros(shape)


#: the last mask read and what it showed: the layers of one forward pass get the same mask object,
#: so only the first reads it (kept with the mask's version counter: a mask written in place is read
#: again)
_MASK_MEMO: list[Any] = [None]


def _visible_lengths(mask: torch.Tensor | None, b: int, s: int) -> tuple[int, ...] | None | bool:
    """How many keys each sequence sees when the last query row of ``mask`` shows a prefix of the
    ``s`` keys (a static cache past its length), as host ints; ``None`` for no mask (every key);
    ``False`` when it hides any other key (left padding, a sliding window), which only the fallback
    computes. A mask costs one host synchronisation per forward pass (the layers share it); without
    padding transformers passes none to sdpa."""
    if mask is None or not isinstance(mask, torch.Tensor):
        return None
    version = getattr(mask, "_version", None)
    memo = _MASK_MEMO[0]
    if memo is not None and memo[0] is mask and version is not None and memo[1] == (version, b, s):
        return memo[2]
    found = _read_mask(mask, b, s)
    _MASK_MEMO[0] = (mask, (version, b, s), found)
    return found


def _read_mask(mask: torch.Tensor, b: int, s: int) -> tuple[int, ...] | bool:
    last = mask[..., -1, :] if mask.dim() >= 2 else mask
    visible = last if last.dtype == torch.bool else last == 0
    visible = visible.reshape(visible.shape[0], -1, visible.shape[-1])
    if visible.shape[1] != 1 or visible.shape[-1] != s or visible.shape[0] not in (1, b):
        return False
    if visible.device.type == "cpu":  # NumPy: a few us for 8K keys, against tens in torch's small ops
        rows = visible[:, 0].numpy()
        lens = tuple(np.count_nonzero(r) for r in rows)  # count_nonzero without an axis: the fast path
        if not all(np.count_nonzero(r[:n]) == n for r, n in zip(rows, lens)):  # the n shown are the first n
            return False
        lens = lens * b if len(lens) == 1 else lens
    else:
        visible = visible[:, 0].expand(b, s)
        lengths = visible.sum(-1)
        prefix = torch.arange(s, device=visible.device)[None] < lengths[:, None]
        if not torch.equal(visible, prefix):
            return False
        lens = tuple(int(n) for n in lengths.tolist())
    return False if min(lens) == 0 else lens


def _fallback_function(fallback: str, module: torch.nn.Module) -> Callable[..., Any]:
    if fallback == "eager":
        # each modeling file defines its own eager attention (the registry's signature): use the module's
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        return fn if fn is not None else _eager
    from transformers import AttentionInterface

    return AttentionInterface()[fallback]


def _eager(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
           **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention with GQA (LLaMA's eager), for a module whose file defines none."""
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    w = torch.matmul(query, k.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        w = w + attention_mask[..., : k.shape[-2]]
    w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


def _make(fallback: str) -> Callable[..., Any]:
    def sparsecore_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        state = getattr(module, "sparsecore_decode", None)
        decode = (isinstance(state, TopKDecode) and state.enabled and not module.training and query.shape[2] == 1
                  and not any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS))
        if decode and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            decode = False  # the sparse step has no gradient: a step that may be differentiated runs dense
            state.dense_fallbacks += 1
            state.forget_bounds()
        if decode:
            lengths = _visible_lengths(attention_mask, key.shape[0], key.shape[2])
            if lengths is False:
                state.dense_fallbacks += 1
                state.forget_bounds()
            else:
                out = state.attend(query[:, :, 0], key, value, key.shape[2] if lengths is None else lengths,
                                   scaling=scaling)
                return out.unsqueeze(1), None
        elif isinstance(state, TopKDecode):
            state.forget_bounds()  # a prefill changes the cache in ways the bounds do not follow
        return _fallback_function(fallback, module)(module, query, key, value, attention_mask, scaling=scaling,
                                                    dropout=dropout, **kwargs)

    sparsecore_attention.__qualname__ = sparsecore_attention.__name__ = f"{PREFIX}{fallback}"
    return sparsecore_attention


def register_attention(fallback: str = "sdpa") -> str:
    """Register top-k decode attention over ``fallback`` (an implementation transformers knows:
    ``"sdpa"``, ``"eager"``, ...) in transformers' ``AttentionInterface`` and ``AttentionMaskInterface``;
    returns its name, ``"sparsecore_<fallback>"``, for ``model.set_attn_implementation(name)``.
    Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if not isinstance(fallback, str) or fallback.startswith(PREFIX):
        raise ValueError(f"register_attention: fallback = {fallback!r}; expected the name of a transformers "
                         "attention implementation such as 'sdpa' or 'eager'")
    if fallback != "eager" and fallback not in AttentionInterface():
        raise ValueError(f"register_attention: fallback = {fallback!r} is not registered in transformers' "
                         f"AttentionInterface; known: eager, {', '.join(sorted(AttentionInterface().valid_keys()))}")
    if fallback not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"register_attention: fallback = {fallback!r} has no mask function in transformers' "
                         "AttentionMaskInterface")
    name = f"{PREFIX}{fallback}"
    if name not in AttentionInterface():
        AttentionInterface.register(name, _make(fallback))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[fallback])
    return name


def topk_decode_layers(model: torch.nn.Module) -> dict[str, TopKDecode]:
    """``{attention module name: its TopKDecode}`` for every layer :func:`patch_model` gave one."""
    return {name: m.sparsecore_decode for name, m in model.named_modules()
            if isinstance(getattr(m, "sparsecore_decode", None), TopKDecode)}
