"""Use what you trained: a run exports cvae.keras and a SavedModel that give its checkpoint's
outputs, in fp32 and bf16; the SavedModel runs where the project cannot be imported;
export.py, generate.py and network.py --from read them, and bad input is one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from machinery import cli, files

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    ROOT,
    assert_one_line_error,
    exported_weights,
    make_mnist_arrays,
    run_script,
    stderr_lines,
)

import dataset
import export
import generate
import network
import pictures

PRECISIONS = ("fp32", "bf16")

# Run in a fresh process: Keras' loader, with the project importable (it registers CVAE).
LOAD_KERAS = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
import keras
import network
inputs = np.load(sys.argv[1])
for run, out in zip(sys.argv[2::2], sys.argv[3::2]):
    model = keras.saving.load_model(run + "/cvae.keras")
    mean, logvar = model.encode(inputs["x"])
    np.savez(out, mean=mean, logvar=logvar,
             pixels=model.decode(inputs["z"], apply_sigmoid=True))
"""
# Run with python -I in another folder: plain TensorFlow, the project out of reach.
LOAD_SAVEDMODEL = """
import importlib.util
import sys
import numpy as np
import tensorflow as tf
assert importlib.util.find_spec("network") is None, "the project can be imported"
inputs = np.load(sys.argv[1])
for run, out in zip(sys.argv[2::2], sys.argv[3::2]):
    loaded = tf.saved_model.load(run + "/cvae_savedmodel")
    decoded = loaded.signatures["serving_default"](z=tf.constant(inputs["z"]))
    encoded = loaded.signatures["encode"](images=tf.constant(inputs["x"]))
    np.savez(out, mean=encoded["mean"], logvar=encoded["logvar"],
             pixels=decoded["pixels"])
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A one-epoch run in each precision, exported by train.py at its end."""
    data = tmp_path_factory.mktemp("data") / "mnist.npz"
    np.savez(data, **make_mnist_arrays())
    outs = {}
    for precision in PRECISIONS:
        outs[precision] = tmp_path_factory.mktemp(precision)
        result = run_script("train.py", "--data", data, "--epochs", "1", "--precision", precision,
                            "--out-dir", outs[precision], "--overwrite")
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"Wrote {outs[precision] / 'cvae.keras'} and" in result.stdout
    return outs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Fixed test images and latent points, for every loader to run."""
    path = tmp_path_factory.mktemp("inputs") / "inputs.npz"
    images = dataset.binarize(make_mnist_arrays(num_train=0, num_test=8, seed=1)["x_test"]).numpy()
    z = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32) * 2
    np.savez(path, x=images, z=z)
    return path


def checkpoint_outputs(run: Path, inputs: Path, graph: bool) -> dict[str, np.ndarray]:
    """The outputs of the run's last checkpoint, run eagerly or as a graph (tf.function)."""
    model = export.load_trained_model(run)[0]

    def outputs(x: tf.Tensor, z: tf.Tensor) -> dict[str, tf.Tensor]:
        mean, logvar = model.encode(x)
        return {"mean": mean, "logvar": logvar, "pixels": model.decode(z, apply_sigmoid=True)}

    run_outputs = tf.function(outputs) if graph else outputs
    with np.load(inputs) as arrays:
        return {name: value.numpy() for name, value in run_outputs(
            tf.constant(arrays["x"]), tf.constant(arrays["z"])).items()}


def test_both_exports_give_the_checkpoints_outputs_in_a_fresh_process(runs, inputs, tmp_path):
    keras_args = [arg for p in PRECISIONS for arg in (runs[p], tmp_path / f"keras_{p}.npz")]
    result = subprocess.run([sys.executable, "-c", LOAD_KERAS, inputs, *keras_args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    saved_args = [arg for p in PRECISIONS for arg in (runs[p], tmp_path / f"saved_{p}.npz")]
    result = subprocess.run([sys.executable, "-I", "-c", LOAD_SAVEDMODEL, inputs, *saved_args],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]

    for precision in PRECISIONS:
        eager = checkpoint_outputs(runs[precision], inputs, graph=False)
        graph = checkpoint_outputs(runs[precision], inputs, graph=True)
        from_keras = np.load(tmp_path / f"keras_{precision}.npz")
        from_savedmodel = np.load(tmp_path / f"saved_{precision}.npz")
        for name in eager:
            message = f"{precision} {name}"
            np.testing.assert_array_equal(from_keras[name], eager[name], err_msg=message)
            # A SavedModel is a graph: the same as the checkpoint's model run as a graph. In
            # bf16, a graph's fused kernels round less often than eager ops (3 digits kept).
            np.testing.assert_array_equal(from_savedmodel[name], graph[name], err_msg=message)
            np.testing.assert_allclose(from_savedmodel[name], eager[name], rtol=0,
                                       atol=1e-6 if precision == "fp32" else 1e-3, err_msg=message)


def test_the_keras_file_keeps_the_settings(runs):
    for precision in PRECISIONS:
        model = network.load_model(runs[precision])
        assert (model.latent_dim, model.precision) == (2, precision)
        assert model.get_config() == {"latent_dim": 2, "precision": precision, "filters": None,
                                      "image_shape": [28, 28, 1], "likelihood": "bernoulli",
                                      "num_classes": 0}


def test_export_script_writes_a_runs_model_again(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["fp32"], out)
    expected = exported_weights(runs["fp32"])
    for replace in (True, False):  # over the files there, then where they are gone
        if not replace:
            shutil.rmtree(out / files.SAVEDMODEL_DIR)
            (out / files.KERAS_FILE).unlink()
        export.main(["--out-dir", str(out)])
        assert not list(out.glob(".*tmp*"))
        exported = exported_weights(out)
        assert exported.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_network_script_prints_the_exported_model(runs, capsys):
    network.main(["--from", str(runs["bf16"])])
    printed = capsys.readouterr().out
    assert f"Loaded {runs['bf16']}: latent_dim 2, precision bf16" in printed
    assert 'Model: "encoder"' in printed and 'Model: "decoder"' in printed
    assert "total 69,989" in printed and "trained)" in printed
    network.load_model(runs["bf16"]).summary()  # the whole model, built: no "not built" error
    network.CVAE().summary()
    assert capsys.readouterr().out.count("Total params: 69,989") == 2


def generated(run: Path, tmp_path: Path, *flags: str) -> np.ndarray:
    """generate.py's pixel probabilities for `flags`, checking the PNG beside them."""
    out = tmp_path / "digits.png"
    generate.main(["--out-dir", str(run), "--out", str(out), "--npy", *flags])
    assert iio.imread(out).ndim == 3
    return np.load(out.with_suffix(".npy"))


def test_generate_draws_from_the_prior_repeatably(runs, tmp_path):
    model = network.load_model(runs["fp32"])
    digits = generated(runs["fp32"], tmp_path, "--num", "5", "--seed", "3")
    assert digits.shape == (5, 28, 28, 1) and digits.dtype == np.float32
    np.testing.assert_array_equal(digits, model.sample(pictures.prior_draws(5, 2, 3)).numpy())
    np.testing.assert_array_equal(generated(runs["fp32"], tmp_path, "--num", "5", "--seed", "3"), digits)
    assert not np.array_equal(generated(runs["fp32"], tmp_path, "--num", "5", "--seed", "4"), digits)


def test_generate_decodes_the_points_given_and_walks_between_two(runs, tmp_path):
    model = network.load_model(runs["fp32"])
    digits = generated(runs["fp32"], tmp_path, "--z", "0.5,-1.2", "--z", "-2,0")
    expected = model.decode(tf.constant([[0.5, -1.2], [-2, 0]]), apply_sigmoid=True).numpy()
    np.testing.assert_allclose(digits, expected, rtol=0, atol=1e-6)  # a graph, and eager ops
    walk = generated(runs["fp32"], tmp_path, "--interpolate", "-2,0", "2,1", "--steps", "5")
    expected = model.decode(tf.constant([[-2, 0], [-1, 0.25], [0, 0.5], [1, 0.75], [2, 1]]),
                            apply_sigmoid=True).numpy()
    np.testing.assert_allclose(walk, expected, rtol=0, atol=1e-6)


def test_generate_writes_its_default_picture_as_a_user_runs_it(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["fp32"], out)
    result = run_script("generate.py", "--out-dir", out)
    assert result.returncode == 0 and stderr_lines(result.stderr) == [], result.stderr[-2000:]
    assert f"Wrote {out / 'generated.png'}: 16 digits decoded from the prior" in result.stdout
    assert iio.imread(out / "generated.png").ndim == 3


BAD_GENERATE_INPUT = {
    "missing run": (["--out-dir", "{tmp}/nowhere"], "nowhere: no such file or folder"),
    "run without export": (["--out-dir", "{tmp}"], "holds no cvae.keras; a run exports one"),
    "wrong --z length": (["--z", "1,2,3"], "--z 1,2,3: 3 number(s), but the model's latent space "
                                           "has 2 dimensions"),
    "bad number": (["--z", "1,two"], "argument --z: '1,two' is not numbers separated by commas"),
    "not finite": (["--z", "inf,0"], "argument --z: 'inf,0' is not finite in float32"),
    "too large": (["--z", "1e40,0"], "argument --z: '1e40,0' is not finite in float32"),
    "seed for given points": (["--z", "0,0", "--seed", "3"], "--seed is for draws from the prior"),
    "out is a folder": (["--out", "{tmp}/folder.png"], "folder.png is a folder; give --out a file"),
    "bad interpolate end": (["--interpolate", "0,0", "1"], "--interpolate 1: 1 number(s)"),
    "zero digits": (["--num", "0"], "argument --num: '0' is not a whole number from 1 to 400"),
    "two modes": (["--num", "4", "--z", "0,0"], "argument --z: not allowed with argument --num"),
    "steps alone": (["--steps", "4"], "--steps is for --interpolate"),
    "not a png": (["--out", "{tmp}/digits.jpg"], "give a name ending in .png"),
    "out in a file": (["--out", "{tmp}/notes.txt/digits.png"], "--out's folder"),
}


@pytest.mark.parametrize("case", BAD_GENERATE_INPUT)
def test_generate_refuses_bad_input_in_one_line_writing_nothing(case, runs, tmp_path, capsys,
                                                                monkeypatch):
    args, expected = BAD_GENERATE_INPUT[case]
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    if "--out-dir" not in args:
        args = ["--out-dir", str(runs["fp32"]), *args]
    (tmp_path / "notes.txt").write_text("keep me\n")
    (tmp_path / "folder.png").mkdir()
    before = sorted(runs["fp32"].iterdir()), sorted(tmp_path.iterdir())
    monkeypatch.setattr(sys, "argv", ["generate.py"])
    with pytest.raises(SystemExit) as stop:
        cli.run(generate.main, [*args, "--npy"])
    assert_one_line_error(capsys.readouterr().err, "generate.py", expected, 2, stop.value.code)
    assert (sorted(runs["fp32"].iterdir()), sorted(tmp_path.iterdir())) == before
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"
