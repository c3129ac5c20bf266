"""The documentation's code runs: every ```python block of README.md and docs/*.md is a test.

One test per block, named ``file:line`` (the line of the opening fence). The blocks of one file run
in order in one shared namespace, so a later block can use the names an earlier one defined;
running a single block (``-k "ops.md:120"``) first runs the blocks above it. Tracebacks point at
the Markdown file's own line numbers.

Each block runs with ``SPARSECORE_BACKEND`` and ``SPARSECORE_VALIDATE`` unset (the docs describe
the defaults), and whatever it changes in the environment or in the dispatcher's registry (the
backend-registration sketch of docs/ops.md registers classes) is undone afterwards, so doc examples
cannot leak into other tests. Blocks fenced as ```text, ```bash etc. are not run.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import sparsecore
import sparsecore.ops

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)")
ENV_VARS = ("SPARSECORE_BACKEND", "SPARSECORE_VALIDATE")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"


def fenced_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(fence line, info string, body) of every fenced block; an unclosed fence is an error."""
    out: list[tuple[int, str, str]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[j]):
            line = lines[j]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"{path.name}:{i + 1}: fence {fence!r} is never closed")
        out.append((i + 1, info, "\n".join(body) + "\n"))
        i = j + 1
    return out


def python_blocks(path: Path) -> list[Block]:
    return [Block(path, line, code) for line, info, code in fenced_blocks(path) if info == "python"]


BLOCKS: list[Block] = [b for p in DOC_FILES for b in python_blocks(p)]


@dataclass
class _FileRun:
    """The shared namespace of one file's blocks and how far they have run."""

    namespace: dict[str, Any] = field(default_factory=lambda: {"__name__": "__doc_example__"})
    done: set[int] = field(default_factory=set)
    failed: int | None = None  # line of the first block that failed


_RUNS: dict[Path, _FileRun] = {}


@contextmanager
def _isolated() -> Iterator[None]:
    """Default environment for the block; undo its changes to os.environ and the backend registry."""
    disp = importlib.import_module(sparsecore.ops.register.__module__)
    disp.load_backends()
    registry = {op: list(classes) for op, classes in disp._REGISTRY.items()}
    env = dict(os.environ)
    for var in ENV_VARS:
        os.environ.pop(var, None)
    try:
        yield
    finally:
        for k in set(os.environ) - set(env):
            del os.environ[k]
        for k, v in env.items():
            if os.environ.get(k) != v:
                os.environ[k] = v
        for op in set(disp._REGISTRY) - set(registry):
            del disp._REGISTRY[op]
        for op, classes in registry.items():
            disp._REGISTRY[op] = classes


def _run(block: Block, run: _FileRun) -> None:
    # pad with newlines so tracebacks show the Markdown file's line numbers
    code = compile("\n" * block.line + block.code, str(block.path), "exec")
    with _isolated():
        try:
            exec(code, run.namespace)
        except BaseException:
            run.failed = block.line if run.failed is None else run.failed
            raise
        finally:
            run.done.add(block.line)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state:UserWarning")
@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled:UserWarning")
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block(block: Block) -> None:
    run = _RUNS.setdefault(block.path, _FileRun())
    for earlier in python_blocks(block.path):
        if earlier.line >= block.line:
            break
        if earlier.line not in run.done:
            _run(earlier, run)
    if run.failed is not None and run.failed < block.line:
        pytest.skip(f"an earlier block of this file ({block.path.name}:{run.failed}) failed; it defines "
                    "names this one may use")
    _run(block, run)


def test_doc_files_parse_and_have_examples() -> None:
    for path in DOC_FILES:
        fenced_blocks(path)  # raises on an unclosed fence
    names = {p.relative_to(ROOT).as_posix() for p in DOC_FILES}
    for doc in ("docs/formats.md", "docs/ops.md", "docs/testing.md"):
        assert doc in names, f"{doc} is missing"
        assert doc in (ROOT / "README.md").read_text(encoding="utf-8"), f"README.md does not link {doc}"
    assert any(b.path.name == "README.md" for b in BLOCKS), "README.md lost its python example"


def test_docs_cover_every_public_format_and_op() -> None:
    """A new op or format must get its section in the docs."""
    formats = (ROOT / "docs" / "formats.md").read_text(encoding="utf-8")
    ops = (ROOT / "docs" / "ops.md").read_text(encoding="utf-8")
    disp = importlib.import_module(sparsecore.ops.register.__module__)
    for name in ("TiledELL", "CSR", "DenseKV", "PagedKV", "TopKIndex"):
        assert f"## {name}" in formats, f"docs/formats.md has no section for {name}"
    for name in sparsecore.__all__:
        if name[0].islower() and name not in disp.OPS:  # the conversion functions
            assert f"`{name}" in formats, f"docs/formats.md does not mention {name}"
    for op in disp.OPS:
        assert f"### `{op}" in ops, f"docs/ops.md has no section for the op {op}"
