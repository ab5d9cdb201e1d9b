"""The tutorial's "Next steps": --filters N, images of other shapes and colours, and the
discretized logistic likelihood for 8-bit pixels, from the data to the pictures."""

from __future__ import annotations

import json
from pathlib import Path

from machinery import files, model_size

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_one_line_error, make_mnist_arrays, run_main, run_script

import dataset
import network
import train

CONVOLUTIONS = (tf.keras.layers.Conv2D, tf.keras.layers.Conv2DTranspose)


def colour_arrays(num_train: int = 64, num_test: int = 32, seed: int = 0) -> dict:
    """CIFAR-shaped uint8 data, as Keras' cifar10.load_data gives it: x (N, 32, 32, 3),
    y (N, 1); a disc whose colour and size depend on the label, on dark noise."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[:32, :32]
    arrays = {}
    for split, n in (("train", num_train), ("test", num_test)):
        labels = rng.integers(0, 10, (n, 1)).astype(np.uint8)
        images = rng.integers(0, 40, (n, 32, 32, 3)).astype(np.uint8)
        for image, label in zip(images, labels[:, 0].astype(int)):
            disc = (rows - 16) ** 2 + (columns - 16) ** 2 < (4 + label) ** 2
            image[disc] = [(70 * label) % 256, (130 * label + 60) % 256, 255 - 25 * label]
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
    return arrays


def test_filters_512_is_the_tutorials_bigger_network():
    model = network.CVAE(2, filters=512)
    assert model_size.count_params(model) == 4_955_749
    convolutions = [layer for part in (model.encoder, model.decoder) for layer in part.layers
                    if isinstance(layer, CONVOLUTIONS)]
    assert [layer.filters for layer in convolutions] == [512, 512, 512, 512, 1]
    default = network.CVAE(2)
    assert [layer.filters for part in (default.encoder, default.decoder) for layer in part.layers
            if isinstance(layer, CONVOLUTIONS)] == [32, 64, 64, 32, 1]


def test_the_model_follows_the_image_shape_and_likelihood():
    model = network.CVAE(3, image_shape=(32, 24, 3), likelihood="logistic")
    x = tf.random.uniform((2, 32, 24, 3))
    mean, logvar = model.encode(x)
    assert mean.shape == (2, 3)
    assert model.decode(mean).shape == (2, 32, 24, 6)  # a mean and a log-scale per channel
    medians = model.sample(mean)
    assert medians.shape == (2, 32, 24, 3)
    assert 0.0 <= float(tf.reduce_min(medians)) <= float(tf.reduce_max(medians)) <= 1.0
    assert np.isfinite(float(network.compute_loss(model, x)))
    rebuilt = network.CVAE(**model.get_config())
    assert rebuilt.image_shape == (32, 24, 3) and rebuilt.likelihood == "logistic"


def expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def direct_discretized_logistic(x: np.ndarray, mean: np.ndarray, log_scale: np.ndarray) -> np.ndarray:
    """log P(x) by the definition, in float64: the logistic's CDF at the bin's edges, the
    first and last bins taking the tails."""
    scale = np.exp(np.maximum(log_scale, -7.0))
    upper = np.where(x > 1 - 1 / 510, 1.0, expit((x + 1 / 510 - mean) / scale))
    lower = np.where(x < 1 / 510, 0.0, expit((x - 1 / 510 - mean) / scale))
    with np.errstate(divide="ignore"):  # a bin far in a tail has no mass in float64
        return np.log(upper - lower)


def test_the_discretized_logistic_is_its_definition_and_sums_to_one():
    rng = np.random.default_rng(0)
    levels = np.arange(256) / 255.0
    mean = rng.uniform(-0.2, 1.2, (40, 1))
    log_scale = rng.uniform(-6.0, 1.0, (40, 1))
    x = np.broadcast_to(levels, (40, 256))
    outputs = np.stack([np.broadcast_to(mean, (40, 256)), np.broadcast_to(log_scale, (40, 256))], -1)
    log_p = network.discretized_logistic_log_prob(
        tf.constant(x[..., None], tf.float32), tf.constant(outputs, tf.float32)).numpy()[..., 0]
    np.testing.assert_allclose(np.exp(log_p).sum(axis=1), 1.0, rtol=1e-4)
    expected = direct_discretized_logistic(x, mean, log_scale)
    likely = expected > -30  # where float64 keeps digits: the bins within reach of the mean
    np.testing.assert_allclose(log_p[likely], expected[likely], rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(log_p))


def test_the_likelihood_has_finite_gradients_far_in_the_tails():
    x = tf.constant([[[[0.0], [0.5], [1.0]]]])
    outputs = tf.Variable([[[[40.0, -7.0], [-40.0, -7.0], [0.5, 6.0]]]])
    with tf.GradientTape() as tape:
        log_p = tf.reduce_sum(network.discretized_logistic_log_prob(x, outputs))
    assert np.all(np.isfinite(tape.gradient(log_p, outputs).numpy())) and np.isfinite(float(log_p))


def test_8bit_images_are_scaled_and_colour_keeps_its_channels():
    images = np.array([[[[0, 128, 255]] * 8] * 8], np.uint8)
    np.testing.assert_allclose(dataset.scale_8bit(images)[0, 0, 0], [0, 128 / 255, 1], rtol=1e-6)
    assert dataset.preprocess(images, "bernoulli").shape == (1, 8, 8, 3)
    grey = make_mnist_arrays(4, 4)["x_train"]
    assert dataset.preprocess(grey, "logistic").shape == (4, 28, 28, 1)


def test_cifar10_comes_from_its_keras_loader_with_labels_of_shape_n_1(monkeypatch):
    a = colour_arrays(40, 20)  # a stand-in: CIFAR-10 cannot be downloaded here
    monkeypatch.setattr(tf.keras.datasets.cifar10, "load_data",
                        lambda: ((a["x_train"], a["y_train"]), (a["x_test"], a["y_test"])))
    (x_train, y_train), (x_test, y_test) = dataset.load_data(name="cifar10").splits
    assert x_train.shape == (40, 32, 32, 3) and y_train.shape == (40,)
    np.testing.assert_array_equal(y_test, a["y_test"][:, 0])


def test_a_colour_run_from_the_data_to_the_pictures(tmp_path):
    data = tmp_path / "colour.npz"
    np.savez(data, **colour_arrays())
    out = tmp_path / "run"
    shown = run_script("dataset.py", "--data", data, "--out-dir", tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "(64, 32, 32, 3)" in shown.stdout and "discretized logistic" in shown.stdout
    assert iio.imread(tmp_path / "dataset_preview.png").ndim == 3
    trained = run_script("train.py", "--data", data, "--epochs", "1", "--filters", "8",
                         "--dataset", "cifar10", "--out-dir", out)
    assert trained.returncode == 0, trained.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["image_shape"] == [32, 32, 3] and config["likelihood"] == "logistic"
    assert config["filters"] == 8
    grid = iio.imread(out / "image_at_epoch_0001.png")[..., :3].astype(int)
    assert np.abs(grid[..., 0] - grid[..., 2]).max() > 0  # colour, not grey
    assert iio.imread(out / "latent_manifold.png").shape == (640, 640, 3)
    evaluated = run_script("evaluate.py", "--out-dir", out, "--iw-samples", "4")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((out / "evaluation.json").read_text())
    iwae = report["iwae_log_likelihood"]["mean"]
    np.testing.assert_allclose(report["bits_per_dim"]["mean"], -iwae / (32 * 32 * 3 * np.log(2)),
                               rtol=1e-5)
    assert report["bits_per_dim"]["mean"] > 0
    generated = run_script("generate.py", "--out-dir", out, "--num", "4", "--npy")
    assert generated.returncode == 0, generated.stderr
    assert np.load(out / "generated.npy").shape == (4, 32, 32, 3)
    signatures = tf.saved_model.load(str(out / files.SAVEDMODEL_DIR)).signatures
    encoded = signatures["encode"](images=tf.zeros((2, 32, 32, 3)))
    assert encoded["mean"].shape == (2, 2)


def test_the_8bit_likelihood_trains_on_grey_images(tmp_path, tiny_npz, capsys, monkeypatch):
    out = tmp_path / "run"
    config = train.build_parser().parse_args(["--likelihood", "logistic"])
    assert config.likelihood == "logistic"
    trained = run_script("train.py", "--data", tiny_npz, "--epochs", "1", "--likelihood", "logistic",
                         "--out-dir", out)
    assert trained.returncode == 0, trained.stderr
    model = network.load_model(out)
    assert model.likelihood == "logistic" and model.image_shape == (28, 28, 1)
    code, stderr = run_main(train.main, ["--out-dir", out, "--resume", "--likelihood", "bernoulli"],
                            "train.py", capsys, monkeypatch)
    assert_one_line_error(stderr, "train.py", "--likelihood bernoulli contradicts", 2, code)


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "many"])
def test_filters_that_are_not_positive_whole_numbers_are_one_line(value, capsys, monkeypatch):
    code, stderr = run_main(network.main, ["--filters", value], "network.py", capsys, monkeypatch)
    assert_one_line_error(stderr, "network.py", "--filters", 2, code)


def test_network_py_shows_the_bigger_network(capsys):
    network.main(["--filters", "512"])
    assert "total 4,955,749" in capsys.readouterr().out


def test_filters_train_to_the_first_grid(tmp_path, tiny_npz):
    out = tmp_path / "run"
    result = run_script("train.py", "--data", tiny_npz, "--epochs", "1", "--filters", "16",
                        "--train-size", "32", "--test-size", "16", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    assert (out / "image_at_epoch_0001.png").is_file()
    assert network.load_model(out).filters == 16
    assert Path(out / "config.json").read_text().count('"filters": 16') == 1
