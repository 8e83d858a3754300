"""The static checks, as tests (CI runs the suite, so they run in CI): ruff's lint rules and its formatting, and
mypy's type check of the package, each the tool's own command run from the repository root with the
configuration in pyproject.toml. A failure shows the tool's output: run the same command to see it locally.

The tools come from the ``lint`` extra (``pip install -e '.[lint]'``; ``.[test]`` includes it). None of these runs
writes into the source tree: ruff runs without its cache, mypy's cache lives in the test's temporary folder.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "analytic_diffusion"


def run_tool(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python -m <tool> ...`` from the repository root, with this interpreter (the environment's own tools)."""
    cmd = [sys.executable, "-m", *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # its captured output is bytes, whatever text= said
        out = b"".join(o for o in (exc.stdout, exc.stderr) if isinstance(o, bytes)).decode(errors="replace")
        pytest.fail(f"`{' '.join(cmd[2:])}` did not finish within {timeout:.0f} s:\n{out}")


def report(r: subprocess.CompletedProcess) -> str:
    cmd = " ".join(r.args[2:])
    hint = ""
    if "No module named" in r.stderr:
        hint = "\n(the tool is not installed: pip install -e '.[lint]')"
    return f"`{cmd}` exited with {r.returncode}:\n{r.stdout}{r.stderr}{hint}"


def test_ruff_lint():
    r = run_tool("ruff", "check", "--no-cache", ".", timeout=120)
    assert r.returncode == 0, report(r)


def test_ruff_format():
    r = run_tool("ruff", "format", "--check", "--no-cache", ".", timeout=120)
    assert r.returncode == 0, report(r)


def test_mypy(tmp_path):
    """mypy over the package as [tool.mypy] configures it (every module, every function annotated)."""
    r = run_tool("mypy", "--cache-dir", str(tmp_path / "mypy-cache"), timeout=600)
    assert r.returncode == 0, report(r)
    # The configuration names the package: every one of its modules was checked (mypy also counts data folders
    # without an __init__.py, such as data/mnist, as namespace packages).
    found = re.search(r"Success: no issues found in (\d+) source files", r.stdout)
    assert found, report(r)
    modules = sum(1 for _ in PKG.rglob("*.py"))
    assert int(found.group(1)) >= modules, f"mypy checked {found.group(1)} files, the package has {modules} modules"
