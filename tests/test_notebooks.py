"""The tutorial notebooks (docs/notebooks) run end to end at their CI size, and the committed copies are executed.

Each notebook reads AD_NOTEBOOK_SIZE ("ci" here: seconds; "full": the committed copy; "gpu": paper-like sizes).
"""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need nbformat and nbclient (test extra)")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need nbformat and nbclient (test extra)")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "docs" / "notebooks").glob("*.ipynb"))


def test_there_are_seven_notebooks():
    assert len(NOTEBOOKS) == 7, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_copy_is_executed_with_pictures(path):
    """Readers see the outputs without running anything: every code cell ran, none raised, pictures are there."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{path.name}: not executed"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"], f"{path.name}: a cell raised"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name}: expected pictures in the committed outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_ci_size(path, tmp_path, monkeypatch):
    monkeypatch.setenv("AD_NOTEBOOK_SIZE", "ci")
    monkeypatch.setenv("AD_THREADS", "1")  # one thread per kernel: CI runs tests in parallel
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=90, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any failure
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert images, "no picture came out"
