"""Every tutorial runs top to bottom on the embedded model, and its known-answer asserts hold."""

from __future__ import annotations

import os

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def test_the_learning_path_is_complete():
    assert [p.stem[:2] for p in TUTORIALS] == ["01", "02", "03", "04", "05", "06", "07"]
    readme = (ROOT / "README.md").read_text()
    for path in TUTORIALS:
        assert f"tutorials/{path.name}" in readme, path.name
        nb = nbformat.read(path, as_version=4)
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name}: commit without outputs"
        assert "assert " in nb.cells[-1].source, f"{path.name}: the last cell states the known answer"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs_top_to_bottom(path):
    nb = nbformat.read(path, as_version=4)
    # As a reader runs it: a plain kernel with its own private worker, not the test run's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_")}
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute(env=env)
    except CellExecutionError as exc:
        failed = next((i for i, c in enumerate(nb.cells) if any(o.get("output_type") == "error" for o in c.get("outputs", []))),
                      "?")
        pytest.fail(f"{path.name}, cell {failed}:\n{str(exc)[-3000:]}", pytrace=False)
