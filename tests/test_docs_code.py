"""The documentation's Python runs as written: every ```python block of README.md, CONTRIBUTING.md and the site's
pages (docs/*.md) is executed, against the real packages.

A page's blocks form one session, as a reader would type them: each block runs after the page's earlier blocks,
in one namespace (every test replays the earlier blocks itself, so the blocks stay independent tests under
xdist). An HTML comment right before a block changes how it runs; the reader sees the block as written:

    <!-- docs-test
    small: `n=64` -> `n=4`        # run at a small size: replace the text (it must occur in the block)
    needs: cuda                   # skipped without a CUDA device, with the reason "needs a CUDA device"
    needs: k_diffusion            # skipped, with the reason, where this module does not import
    fresh                         # start a new session (the earlier blocks are not replayed)
    -->

The text around a block with ``needs`` must tell the reader what it needs.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FENCE_OPEN = re.compile(r"^```(\w*)[^`]*$")
DIRECTIVE = re.compile(r"<!--\s*docs-test\b(.*?)-->", re.S)
SMALL = re.compile(r"^small:\s*`([^`]+)`\s*->\s*`([^`]*)`$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    source: str
    small: list = field(default_factory=list)  # (old, new) replacements
    needs: list = field(default_factory=list)  # "cuda" or module names
    fresh: bool = False

    @property
    def id(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{path}:{self.line}"

    def code(self) -> str:
        src = self.source
        for old, new in self.small:
            if old not in src:
                raise AssertionError(f"{self.id}: small-size override {old!r} does not occur in the block")
            src = src.replace(old, new)
        return src


def parse_directive(text: str, where: str) -> dict:
    spec = {"small": [], "needs": [], "fresh": False}
    for raw in text.strip().splitlines():
        line = raw.split("  #", 1)[0].strip()
        if not line:
            continue
        m = SMALL.match(line)
        if m:
            spec["small"].append((m.group(1), m.group(2)))
        elif line.startswith("needs:"):
            spec["needs"] += [n.strip() for n in line[len("needs:") :].split(",") if n.strip()]
        elif line == "fresh":
            spec["fresh"] = True
        else:
            raise ValueError(f"{where}: unknown docs-test directive {line!r}")
    return spec


def python_blocks(path: Path) -> list:
    """The ```python blocks of a Markdown file, with the docs-test directive right before each (if any)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks = []
    i = 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if m.group(1) == "python":
            before = "\n".join(lines[:start]).rstrip()
            spec = {"small": [], "needs": [], "fresh": False}
            if before.endswith("-->"):
                d = list(DIRECTIVE.finditer(before))
                if d and d[-1].end() == len(before):
                    spec = parse_directive(d[-1].group(1), f"{path.name}:{start + 1}")
            blocks.append(Block(path, start + 1, "\n".join(lines[start + 1 : end]), **spec))
        i = end + 1
    return blocks


def documented_files() -> list:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    files += sorted(p for p in (ROOT / "docs").rglob("*.md") if "tooling" not in p.parts)
    return [p for p in files if p.is_file()]


def all_blocks() -> list:
    return [b for p in documented_files() for b in python_blocks(p)]


def session(block: Block) -> list:
    """The blocks that run for ``block``: its page's earlier blocks since the last ``fresh`` one, then itself."""
    page = python_blocks(block.path)
    index = next(i for i, b in enumerate(page) if b.line == block.line)
    first = max([i for i in range(index + 1) if page[i].fresh], default=0)
    return page[first : index + 1]


def missing(block: Block):
    """Why the block cannot run here (a skip reason), or None."""
    for need in block.needs:
        if need == "cuda":
            if not torch.cuda.is_available():
                return "needs a CUDA device"
            continue
        try:
            importlib.import_module(need)
        except Exception as exc:  # an import can fail with more than ImportError (a mismatched torchvision)
            return f"needs {need}, which does not import on this machine ({type(exc).__name__}: {exc})"
    return None


@pytest.mark.parametrize("block", all_blocks(), ids=lambda b: b.id)
def test_python_block_runs(block, tmp_path, monkeypatch):
    reason = missing(block)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)  # what a block writes (run folders) lands in a scratch folder
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "__docs__"}
    for earlier in session(block):
        if earlier is not block and missing(earlier):
            continue  # a block skipped here; the blocks after it must not depend on it
        code = compile(earlier.code(), earlier.id, "exec")
        exec(code, namespace)


def test_the_collector_reads_directives_and_sessions(tmp_path):
    """The parser itself: directives, sessions and small-size overrides, on a planted page."""
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\na = 1\n```\n\ntext\n<!-- docs-test\nsmall: `n=64` -> `n=2`\nneeds: cuda, json\n-->\n"
        "```python\nb = a + int('n=64'[2:])\n```\n\n```bash\necho no\n```\n\n<!-- docs-test fresh -->\n"
        "```python\nc = 3\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    assert [b.line for b in blocks] == [3, 12, 21]
    assert blocks[1].small == [("n=64", "n=2")] and blocks[1].needs == ["cuda", "json"]
    assert blocks[1].code() == "b = a + int('n=2'[2:])" and blocks[2].fresh
    assert [b.line for b in session(blocks[1])] == [3, 12] and [b.line for b in session(blocks[2])] == [21]
    assert missing(Block(page, 1, "", needs=["json"])) is None
    assert "does not import" in missing(Block(page, 1, "", needs=["no_such_module_here"]))
    bad = Block(page, 1, "x = 1", small=[("y", "z")])
    with pytest.raises(AssertionError, match="does not occur"):
        bad.code()
    with pytest.raises(ValueError, match="unknown docs-test directive"):
        parse_directive("smal: `a` -> `b`", "page.md:1")


def test_every_page_with_python_is_collected():
    """README.md has Python blocks, and the collector finds blocks in the site's pages too."""
    files = {b.path.name for b in all_blocks()}
    assert "README.md" in files and len(files) >= 3, files
    assert os.path.isfile(ROOT / "mkdocs.yml")
