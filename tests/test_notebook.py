"""The notebook: cvae_tensorflow.ipynb holds cvae_tensorflow.py's cells without outputs, runs
top to bottom in a real Jupyter kernel, and opened without the project says how to get it."""

from __future__ import annotations

import csv
import shlex
from pathlib import Path

import imageio.v3 as iio
import jupytext
import nbclient
import nbformat
import numpy as np
import pytest
from conftest import ROOT
from ipykernel.kernelspec import write_kernel_spec
from nbclient.exceptions import CellExecutionError

SCRIPT, NOTEBOOK = ROOT / "cvae_tensorflow.py", ROOT / "cvae_tensorflow.ipynb"
REMAKE = "jupytext --to ipynb --update cvae_tensorflow.py"  # README.md says the same


def cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_the_notebook_is_the_scripts_cells_without_outputs():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert cells(committed) == cells(jupytext.read(SCRIPT)), f"cvae_tensorflow.ipynb is stale: {REMAKE}"
    for cell in committed.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"cvae_tensorflow.ipynb was saved with outputs (clear them: Jupyter's Edit menu, "
                f"Clear Outputs of All Cells, then save): {cell.source[:60]}")
    assert committed.metadata.kernelspec.name == "python3"


@pytest.fixture
def python3_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel named python3 is this interpreter (its virtualenv, its TensorFlow), whatever
    kernels the machine has installed elsewhere: JUPYTER_PATH comes first."""
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))


def execute(notebook: nbformat.NotebookNode, folder: Path) -> None:
    """Run `notebook` in a fresh python3 kernel started in `folder`, as Jupyter starts it in
    the notebook's folder; its cells get their outputs. A cell that raises stops the run."""
    nbclient.NotebookClient(notebook, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(folder)}}).execute()


def outputs(cell: nbformat.NotebookNode, kind: str) -> list[nbformat.NotebookNode]:
    return [output for output in cell.outputs if output.output_type == kind]


def test_the_notebook_runs_in_a_kernel_on_tiny_data(python3_kernel, tiny_npz, tmp_path, monkeypatch):
    out = tmp_path / "nb"
    monkeypatch.setenv("CVAE_DATA", str(tiny_npz))
    monkeypatch.setenv("CVAE_FLAGS", f"--epochs 1 --out-dir {shlex.quote(str(out))}")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    execute(notebook, ROOT)  # an error in a cell fails the test with its traceback
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]

    assert not [output.text for cell in code for output in outputs(cell, "stream") if output.name == "stderr"]
    first = "".join(output.text for output in outputs(code[0], "stream"))
    assert first.startswith("Device: ") and first.count("\n") == 1, first  # our line, no library's
    stdout = "".join(output.text for cell in code for output in outputs(cell, "stream"))
    assert "train (96, 28, 28, 1), test (32, 28, 28, 1)" in stdout and "Epoch: 1, Test set ELBO:" in stdout
    shown = [mime for cell in code for output in outputs(cell, "display_data") for mime in output.data
             if mime.startswith("image/")]
    assert shown == ["image/png", "image/png", "image/gif", "image/png"]  # preview, epoch 1, GIF, manifold

    for name in ("dataset_preview.png", "image_at_epoch_0000.png", "image_at_epoch_0001.png",
                 "latent_manifold.png"):
        assert np.ptp(iio.imread(out / name)) > 0, name  # drawn, not blank
    assert iio.imread(out / "latent_manifold.png").shape == (20 * 28, 20 * 28)  # 20 x 20 digits
    assert iio.imread(out / "cvae.gif", index=None).shape[0] == 2  # epochs 0 and 1
    with open(out / "metrics.csv") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["0", "1"]
    assert (out / "cvae.keras").is_file() and (out / "cvae_savedmodel" / "saved_model.pb").is_file()


def test_opened_alone_the_notebook_says_in_one_line_how_to_get_the_project(python3_kernel, tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.raises(CellExecutionError):
        execute(notebook, tmp_path)  # a folder without the project's modules, as on Colab
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    [error] = code[0].outputs
    assert error.output_type == "error" and error.ename == "ModuleNotFoundError"
    assert "\n" not in error.evalue
    for advice in ("No module named 'cli'", "clone or upload", "pip install -r requirements.txt"):
        assert advice in error.evalue
    assert not any(cell.outputs for cell in code[1:])  # the run stops there


def test_bad_data_stops_the_notebook_with_one_line(python3_kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("CVAE_DATA", str(tmp_path / "missing.npz"))
    monkeypatch.setenv("CVAE_FLAGS", f"--out-dir {shlex.quote(str(tmp_path / 'nb'))}")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.raises(CellExecutionError):
        execute(notebook, ROOT)
    shown = [output.traceback for cell in notebook.cells if cell.cell_type == "code"
             for output in outputs(cell, "error")]
    assert shown == [[f"UserError: {tmp_path / 'missing.npz'}: no such file or folder"]]  # no traceback
