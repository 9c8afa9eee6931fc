"""examples/pretrained_convnet: the book's chapter 5.3 as a notebook. Its .ipynb is the jupytext
pairing of its .py with outputs stripped, and (slow) nbmake runs it end to end on generated data."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from helpers import REPO, script_env

SOURCE = Path(REPO) / "examples" / "pretrained_convnet.py"
NOTEBOOK = SOURCE.with_suffix(".ipynb")


def test_the_notebook_is_its_py_file_with_outputs_stripped():
    ipynb = nbformat.read(NOTEBOOK, as_version=4)
    paired = jupytext.read(SOURCE)
    assert [(c.cell_type, c.source) for c in ipynb.cells] == [(c.cell_type, c.source) for c in paired.cells]
    code = [c for c in ipynb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.mark.slow
def test_the_notebook_runs_the_three_phases_on_generated_data(tmp_path):
    shutil.copy(NOTEBOOK, tmp_path)
    env = script_env(tmp_path, VGGJAX_NOTEBOOK_SMOKE="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=",
                             "--rootdir", str(tmp_path), "--nbmake", NOTEBOOK.name], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-5000:]
    plots = tmp_path / "runs" / "notebook_smoke_plots"
    assert sorted(p.name for p in plots.glob("*.png")) == [
        "features.png", "finetune.png", "frozen.png"]
    results = json.loads((tmp_path / "runs" / "notebook_smoke" / "results.json").read_text())
    assert sorted(results) == ["features", "finetune", "frozen"]
    assert all(0 <= r["test_accuracy"] <= 1 for r in results.values())
