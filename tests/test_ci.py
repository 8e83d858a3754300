"""CI runs what the README tells a user to run: the README's test command, verbatim, in .ci/run, which fails on
any failing step; and the suite's randomness replays: a test's inputs depend on the base seed and its id only."""

import os
import random
import re
import subprocess
import sys

import numpy as np
import torch
from conftest import BASE_SEED, seed_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    block = re.search(r"\*\*Run the tests\*\*.*?```bash\n(.*?)\n```", readme, re.S)
    assert block, "README: no 'Run the tests' command block"
    command = block.group(1).strip()
    assert "python -m pytest" in command
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as fh:
        lines = [line.strip() for line in fh]
    assert command in lines, f".ci/run does not run the README's test command {command!r}"
    assert "set -euo pipefail" in lines


def test_global_generators_are_seeded_per_test(request):
    """torch's, NumPy's and Python's global generators start every test from (base seed, test id)."""
    seed = seed_for(request.node.nodeid)
    draws = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002 (the legacy global generator)
    assert torch.equal(draws[0], torch.rand(3, generator=torch.Generator().manual_seed(seed)))
    assert np.array_equal(draws[1], np.random.RandomState(seed % 2**32).rand(3))
    assert draws[2] == random.Random(seed).random()
    probe = os.environ.get("AD_SEED_PROBE")
    if probe:  # written for test_a_replay_draws_what_the_run_drew
        with open(probe, "a", encoding="utf-8") as fh:
            fh.write(f"{BASE_SEED} {draws[0].tolist()} {draws[1].tolist()} {draws[2]}\n")


def test_seed_depends_on_base_seed_and_id_only():
    assert seed_for("a") == seed_for("a") and seed_for("a") != seed_for("b")
    assert 0 <= seed_for("a") < 2**63


def test_a_replay_draws_what_the_run_drew(tmp_path):
    """AD_TEST_SEED=S replays a test alone exactly as it ran after others (and a random base seed differs)."""
    probe = tmp_path / "draws.txt"
    me = "tests/test_ci.py::test_global_generators_are_seeded_per_test"
    runs = [
        ("123", ["tests/test_ci.py::test_seed_depends_on_base_seed_and_id_only", me]),
        ("123", [me]),
        ("random", [me]),
    ]
    for seed, ids in runs:
        env = dict(os.environ, AD_TEST_SEED=seed, AD_SEED_PROBE=str(probe))
        for name in ("PYTEST_XDIST_WORKER", "AD_TEST_OUTCOMES"):
            env.pop(name, None)
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *ids],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = probe.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and lines[0] == lines[1] and lines[0].startswith("123 ")
    assert lines[2] != lines[0]
