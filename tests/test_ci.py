"""CI runs what the README tells a user to run: the README's test command, verbatim, in .ci/run, which fails on
any failing step."""
import os
import re

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
