"""The documentation site builds without a warning: ``mkdocs build --strict`` (mkdocs.yml) fails on a broken link
or anchor, a cross-reference that does not resolve, a page missing from the navigation or a navigation entry
without its page, and docs/tooling/hooks.py reports links to files that do not exist."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("mkdocs", reason="the docs build needs the docs extra (pip install -e .[docs])")
pytest.importorskip("mkdocstrings", reason="the docs build needs the docs extra (pip install -e .[docs])")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # mkdocs-material's notice about MkDocs 2.0 is not a warning
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def warnings(result: subprocess.CompletedProcess) -> list:
    return [line for line in (result.stdout + result.stderr).splitlines() if re.match(r"^(WARNING|ERROR)\b", line)]


def test_site_builds_strict(tmp_path):
    result = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0 and not warnings(result), result.stdout[-4000:] + result.stderr[-4000:]
    site = tmp_path / "site"
    for page in ["index.html", "design/index.html", "methods/index.html", "benchmarks-results/index.html"]:
        assert (site / page).is_file(), page
    api = (site / "api" / "denoisers" / "index.html").read_text(encoding="utf-8")
    assert 'id="analytic_diffusion.denoisers.Optimal"' in api  # the reference rendered from the docstrings
    assert ":class:" not in api and ":func:" not in api  # Sphinx roles turned into code by the griffe extension


def test_every_public_name_is_in_the_api_index():
    import analytic_diffusion as ad

    index = (ROOT / "docs" / "api" / "index.md").read_text(encoding="utf-8")
    missing = [name for name in ad.__all__ if name != "__version__" and f"[`{name}`]" not in index]
    assert not missing, f"docs/api/index.md does not list {missing}"


def test_a_broken_link_fails_the_build(tmp_path):
    """The strict build is a real check: a copy of the site with a link to a missing page does not build."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ["mkdocs.yml", "README.md", "CONTRIBUTING.md", "CHANGELOG.md", "LICENSE"]:
        (copy / name).write_bytes((ROOT / name).read_bytes())
    (copy / "bench").mkdir()
    (copy / "bench" / "RESULTS.md").write_bytes((ROOT / "bench" / "RESULTS.md").read_bytes())
    docs = copy / "docs"
    shutil.copytree(ROOT / "docs", docs)
    (copy / "analytic_diffusion").symlink_to(ROOT / "analytic_diffusion")
    page = docs / "data.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [the missing page](no-such-page.md).\n", encoding="utf-8")
    result = build(copy / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0 and any("no-such-page.md" in w for w in warnings(result)), result.stderr[-3000:]
