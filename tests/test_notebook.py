"""The notebook: cvae_tensorflow.ipynb holds cvae_tensorflow.py's cells without outputs,
imports none of the project, holds the model and loss of network.py, and runs top to
bottom in a real Jupyter kernel, copied alone into an empty folder as on Colab."""

from __future__ import annotations

import ast
import os
import shutil
import sys
from pathlib import Path

import imageio.v3 as iio
import jupytext
import nbclient
import nbformat
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, make_mnist_arrays, run_script, stderr_lines
from ipykernel.kernelspec import write_kernel_spec

import network

SCRIPT, NOTEBOOK = ROOT / "cvae_tensorflow.py", ROOT / "cvae_tensorflow.ipynb"
REMAKE = "jupytext --to ipynb --update cvae_tensorflow.py"  # README.md says the same
WHAT_COLAB_HAS = {"glob", "os", "sys", "time", "warnings", "imageio", "matplotlib", "numpy", "PIL",
                  "tensorflow", "IPython"}


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
    [parameters] = [cell for cell in committed.cells if "parameters" in cell.metadata.get("tags", [])]
    assert {"epochs = 10", "train_size = 60000", "test_size = 10000"} <= set(parameters.source.splitlines())
    assert {"filters = None", 'dataset = "mnist"'} <= {line.split("  #")[0] for line in
                                                      parameters.source.splitlines()}


def test_the_notebook_imports_only_what_colab_has():
    imported = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= WHAT_COLAB_HAS, imported - WHAT_COLAB_HAS


def notebook_definitions() -> dict:
    """The notebook's CVAE, log_normal_pdf and compute_loss, defined as its cells define them."""
    tree = ast.parse(SCRIPT.read_text())
    wanted = [node for node in tree.body if getattr(node, "name", None) in
              ("CVAE", "log_normal_pdf", "compute_loss")]
    namespace = {"tf": tf, "np": np}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(SCRIPT), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("filters", [None, 8])  # the tutorial's, and its "Next steps"
def test_the_notebooks_model_and_loss_are_network_pys(filters):
    notebook = notebook_definitions()
    ours, theirs = network.CVAE(2, filters=filters), notebook["CVAE"](2, filters)
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    rng = np.random.default_rng(0)
    theirs.set_weights([rng.normal(scale=0.1, size=w.shape) for w in theirs.weights])
    ours.set_weights(theirs.get_weights())
    x = tf.constant((rng.random((8, 28, 28, 1)) < 0.3).astype(np.float32))
    z = tf.constant(rng.normal(size=(8, 2)), tf.float32)
    for a, b in zip(ours.encode(x), theirs.encode(x)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ours.decode(z), theirs.decode(z))
    np.testing.assert_array_equal(ours.sample(z), theirs.sample(z))
    mean, logvar = ours.encode(x)
    np.testing.assert_array_equal(network.log_normal_pdf(z, mean, logvar),
                                  notebook["log_normal_pdf"](z, mean, logvar))
    losses = []
    for model, compute_loss in ((ours, network.compute_loss), (theirs, notebook["compute_loss"])):
        tf.random.set_seed(1)  # both draw their noise with tf.random.normal: the same noise
        losses.append(float(compute_loss(model, x)))
    assert losses[0] == losses[1]


@pytest.fixture
def python3_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel named python3 is this interpreter (its virtualenv, its TensorFlow), whatever
    kernels the machine has installed elsewhere: JUPYTER_PATH comes first."""
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))


def outputs(cell: nbformat.NotebookNode, kind: str) -> list[nbformat.NotebookNode]:
    return [output for output in cell.outputs if output.output_type == kind]


def test_the_notebook_runs_alone_in_an_empty_folder(python3_kernel, tmp_path, monkeypatch):
    """As on Colab: the notebook by itself, its settings overridden in a cell after its
    parameters cell, and the data from CVAE_DATA (offline)."""
    folder = tmp_path / "colab"
    folder.mkdir()
    shutil.copy(NOTEBOOK, folder)
    data = tmp_path / "mnist.npz"
    np.savez(data, **make_mnist_arrays(num_train=96, num_test=32))
    monkeypatch.setenv("CVAE_DATA", str(data))
    # A kernel shows plots inline, as on Colab, unless MPLBACKEND (set on many headless
    # machines and CI services) tells matplotlib otherwise: the kernel must not inherit it.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(folder / NOTEBOOK.name, as_version=4)
    parameters = next(i for i, cell in enumerate(notebook.cells)
                      if "parameters" in cell.metadata.get("tags", []))
    override = nbformat.v4.new_code_cell("epochs = 2; train_size = 64; test_size = 32")
    notebook.cells.insert(parameters + 1, override)
    nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(folder)}}).execute()

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    stdout = "".join(output.text for cell in code for output in outputs(cell, "stream")
                     if output.name == "stdout")
    assert "Epoch: 2, Test set ELBO:" in stdout and "Epoch: 3" not in stdout
    shown = [mime for cell in code for output in outputs(cell, "display_data") for mime in output.data
             if mime.startswith("image/")]
    # The last grid (the loop's clear_output clears the ones before), display_image, the GIF,
    # the manifold.
    assert shown == ["image/png", "image/png", "image/gif", "image/png"]
    written = sorted(path.name for path in folder.iterdir())
    assert written == ["cvae.gif", "cvae_tensorflow.ipynb", "image_at_epoch_0000.png",
                       "image_at_epoch_0001.png", "image_at_epoch_0002.png"]
    assert np.ptp(iio.imread(folder / "image_at_epoch_0002.png")) > 0  # drawn, not blank
    # Epochs 0 to 2: the GIF writer merges the tutorial's repeated last frame into the one before.
    assert iio.imread(folder / "cvae.gif", index=None).shape[0] == 3


def test_the_notebook_runs_as_a_script(tmp_path):
    data = tmp_path / "mnist.npz"
    np.savez(data, **make_mnist_arrays(num_train=64, num_test=32))
    folder = tmp_path / "run"
    folder.mkdir()
    result = run_script("cvae_tensorflow.py", env={"CVAE_DATA": str(data)}, cwd=folder)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Epoch: 10, Test set ELBO:" in result.stdout
    assert (folder / "image_at_epoch_0010.png").is_file() and (folder / "cvae.gif").is_file()
    assert not [line for line in stderr_lines(result.stderr) if "Warning" in line]


def test_missing_data_stops_the_script_with_one_line(tmp_path):
    result = run_script("cvae_tensorflow.py", env={"CVAE_DATA": str(tmp_path / "missing.npz")},
                        cwd=tmp_path)
    assert result.returncode == 2
    assert stderr_lines(result.stderr)[-1] == f"CVAE_DATA={tmp_path / 'missing.npz'}: no such file"


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_the_notebooks_dataset_setting_wins_over_cvae_data(tmp_path, monkeypatch, name):
    # CVAE_DATA is MNIST's file: with dataset = "fashion_mnist" the notebook downloads that,
    # rather than train on MNIST's images as if they were Fashion-MNIST's.
    local, download = make_mnist_arrays(seed=1), make_mnist_arrays(seed=2)
    np.savez(tmp_path / "mnist.npz", **local)
    monkeypatch.setenv("CVAE_DATA", str(tmp_path / "mnist.npz"))
    monkeypatch.setattr(tf.keras.datasets.fashion_mnist, "load_data", lambda: (
        (download["x_train"], download["y_train"]), (download["x_test"], download["y_test"])))
    data_cell = next(cell.source for cell in jupytext.read(SCRIPT).cells if "CVAE_DATA" in cell.source
                     and cell.cell_type == "code" and "load_data" in cell.source)
    scope = {"os": os, "sys": sys, "np": np, "tf": tf, "dataset": name, "train_size": 96, "test_size": 32}
    exec(data_cell, scope)
    expected = local if name == "mnist" else download
    np.testing.assert_array_equal(scope["train_images"], expected["x_train"])
