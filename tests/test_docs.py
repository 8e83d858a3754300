"""The design notes are part of the repository: every "docs/<file>.md §n" reference points at a heading that
exists, and no file cites a document that is not in the repository."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".h", ".cpp", ".cu", ".cuh", ".toml", ".md", ".sh"}
# "docs/design.md §8.4", "docs/methods.md §9a", "docs/design.md §3-4", "docs/methods.md §1.2, §2 and §5";
# the bare "design.md §3" that the notes use for each other counts too.
SECTION = r"§\s?(\d+(?:\.\d+)*[a-z]?(?:[-–]\d+(?:\.\d+)*)?)"
REFERENCE = re.compile(r"(?:docs/)?(design|methods)\.md\s+" + SECTION + r"((?:\s*(?:,|and)\s*" + SECTION + r")*)")
FOLLOWING = re.compile(SECTION)
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s")
# Documents that live outside the repository (the project's private notes); spelt in pieces so that this file
# does not cite them itself.
OUTSIDE = [
    "DESIGN" + ".md",
    "reference/" + "methods.md",
    "kernel-" + "performance.md",
    "peer-analytic-diffusion-" + "studio.md",
    "peer " + "spec §",
    "/work/" + "shared",
]


def tracked_text_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout, so the tracked files are unknown ({exc})")
    names = [n for n in out.stdout.decode("utf-8").split("\0") if n]
    return [ROOT / n for n in names if Path(n).suffix in TEXT_SUFFIXES and (ROOT / n).is_file()]


def headings(doc: Path) -> set:
    """Section numbers of a Markdown file's headings ("## 5. Numerics" -> "5", "### 8.1 Split-N" -> "8.1")."""
    found = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = HEADING.match(line)
        if m:
            found.add(m.group(1))
    return found


def wanted_sections(token: str) -> list:
    """Sections a reference needs: "9a" -> ["9"], "3-4" -> ["3", "4"], "8.4" -> ["8.4"]."""
    parts = re.split(r"[-–]", token)
    return [re.sub(r"[a-z]$", "", p) for p in parts]


def bad_references(paths, docs_dir: Path) -> list:
    """'file:line: reference' for every reference to a missing doc or a section without a heading."""
    cache = {}
    bad = []
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in REFERENCE.finditer(text):
            name = m.group(1) + ".md"
            doc = docs_dir / name
            if name not in cache:
                cache[name] = headings(doc) if doc.is_file() else None
            tokens = [m.group(2)] + FOLLOWING.findall(m.group(3) or "")
            line = text.count("\n", 0, m.start()) + 1
            for token in tokens:
                if cache[name] is None:
                    bad.append(f"{path}:{line}: {m.group(0)!r} (docs/{name} does not exist)")
                    break
                missing = [s for s in wanted_sections(token) if s not in cache[name]]
                if missing:
                    bad.append(f"{path}:{line}: {m.group(0)!r} (no heading § {', '.join(missing)} in docs/{name})")
    return bad


def outside_citations(paths) -> list:
    bad = []
    for path in paths:
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for name in OUTSIDE:
                if name in line:
                    bad.append(f"{path}:{i}: cites {name}")
    return bad


def test_every_section_reference_has_a_heading():
    files = tracked_text_files()
    assert any(p.name == "design.md" for p in files) and any(p.name == "methods.md" for p in files)
    here = Path(__file__).resolve()
    bad = bad_references([p for p in files if p.resolve() != here], ROOT / "docs")  # (its examples are planted)
    assert not bad, "references to sections that do not exist:\n" + "\n".join(bad)


def test_no_file_cites_a_document_outside_the_repository():
    bad = outside_citations(tracked_text_files())
    assert not bad, "files citing documents that are not in the repository:\n" + "\n".join(bad)


def test_the_checks_catch_planted_mistakes(tmp_path):
    """The checkers themselves: a missing section, a missing file and an outside citation are all reported."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "design.md").write_text("# Title\n## 5. Numerics\n### 8.4 Patch kernel\n## 9. Floors\n", encoding="utf-8")
    good = tmp_path / "good.py"
    good.write_text('"""See docs/design.md §5, §8.4 and §9a; design.md §5."""\n', encoding="utf-8")
    assert bad_references([good], docs) == []
    planted = tmp_path / "bad.py"
    planted.write_text(
        '"""docs/design.md §8.5, docs/design.md §5-6, docs/design.md §5, §7, docs/methods.md §1.2\n'
        + OUTSIDE[0]
        + ' §3"""\n',
        encoding="utf-8",
    )
    bad = bad_references([planted], docs)
    assert len(bad) == 4, bad
    assert any("8.5" in b for b in bad) and any("§ 6" in b for b in bad) and any("§ 7" in b for b in bad)
    assert any("methods.md does not exist" in b for b in bad)
    assert len(outside_citations([planted])) == 1
