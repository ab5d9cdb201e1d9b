"""--conditional: q(z|x, y) and p(x|z, y) trained on compute_loss, and what a run of it
writes, evaluates, exports and draws."""

from __future__ import annotations

import json

from machinery import files

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_one_line_error, make_mnist_arrays, run_main, run_script

import dataset
import evaluate
import export
import generate
import network


def test_the_conditional_model_takes_the_class_beside_the_image_and_the_code():
    tf.keras.utils.set_random_seed(1)
    model = network.CVAE(2, num_classes=10)
    assert model.encoder.input_shape == (None, 28, 28, 11) and model.decoder.input_shape == (None, 12)
    x = dataset.binarize(make_mnist_arrays(num_train=4, num_test=0, seed=1)["x_train"])
    eps = tf.random.stateless_normal((4, 2), seed=(1, 2))
    y = tf.constant([0, 3, 3, 9])
    losses = [float(network.compute_loss(model, x, eps, y=tf.fill([4], c))) for c in (0, 5)]
    assert losses[0] != losses[1]  # the class changes the ELBO
    mean, logvar = model.encode(x, y)
    z = model.reparameterize(mean, logvar, eps)
    expected = -tf.reduce_mean(-tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
        logits=model.decode(z, y=y), labels=x), axis=[1, 2, 3]) + network.log_normal_pdf(z, 0., 0.)
        - network.log_normal_pdf(z, mean, logvar))
    np.testing.assert_allclose(network.compute_loss(model, x, eps, y=y), expected, rtol=1e-6)
    assert network.CVAE(**model.get_config()).num_classes == 10
    assert network.CVAE(2).num_classes == 0  # the tutorial's: no classes


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conditional")
    data = folder / "mnist.npz"
    np.savez(data, **make_mnist_arrays(num_train=320, num_test=40, seed=4))
    out = folder / "run"
    result = run_script("train.py", "--data", data, "--conditional", "--beta", "2", "--epochs", "2",
                        "--learning-rate", "1e-3", "--out-dir", out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, data, result


def test_a_conditional_run_writes_its_analogies_and_records_the_setting(conditional_run):
    """(The run has --beta 2 too: one process for both settings.)"""
    out, _, result = conditional_run
    config = json.loads((out / "config.json").read_text())
    assert config["conditional"] is True and config["beta"] == 2.0
    assert "weighs the KL term by --beta 2" in result.stdout
    assert "analogies.png" in result.stdout and not (out / "latent_manifold.png").exists()
    analogies = iio.imread(out / "analogies.png")
    assert analogies.shape[1] > analogies.shape[0] * 0.8 and analogies.std() > 0  # 11 columns, 10 rows
    model = network.load_model(out)
    assert model.num_classes == 10
    reloaded = tf.saved_model.load(str(out / files.SAVEDMODEL_DIR))
    drawn = reloaded.signatures["decode"](z=tf.zeros((3, 2)), y=tf.constant([1, 2, 3]))["pixels"]
    np.testing.assert_allclose(drawn, model.decode(tf.zeros((3, 2)), True, y=tf.constant([1, 2, 3])),
                               atol=1e-6)


def test_evaluate_reports_log_p_x_given_y_log_p_x_and_the_accuracy(conditional_run, capsys):
    out, _, _ = conditional_run
    evaluate.main(["--out-dir", str(out), "--iw-samples", "5"])
    report = json.loads((out / "evaluation.json").read_text())
    assert report["beta"] == 2.0  # the figures are the ELBO's, B = 1, with B beside them
    given, marginal = report["conditional_log_likelihood"]["mean"], report["iwae_log_likelihood"]["mean"]
    # log p(x) = log sum_y p(y) p(x|y) >= log p(y_true) + log p(x|y_true), so the gap is at
    # most -log p(y_true), about ln 10; and at least 0 where the true class is the likeliest.
    assert -1 < given - marginal < np.log(10) + 1, (given, marginal)
    correct = report["accuracy"] * report["test_images"]  # a count of the test images
    assert correct == pytest.approx(round(correct), abs=1e-6) and 0 <= round(correct) <= report["test_images"]
    assert f"{report['accuracy']:.4f}" in capsys.readouterr().out
    assert (out / "analogies.png").is_file() and not (out / "interpolation.png").exists()


def test_generate_draws_the_class_asked_for(conditional_run, capsys, monkeypatch):
    out, _, _ = conditional_run
    generate.main(["--out-dir", str(out), "--label", "7", "--num", "6", "--npy"])
    assert "class 7" in capsys.readouterr().out
    model = network.load_model(out)
    expected = model.sample(generate.pictures.prior_draws(6, 2, 0), tf.fill([6], 7)).numpy()
    np.testing.assert_allclose(np.load(out / "generated.npy"), expected, atol=1e-6)
    # At points given (no draws of generate.py's own to repeat): the decoder's images of class 7.
    generate.main(["--out-dir", str(out), "--label", "7", "--z", "0.5,-0.5", "--z", "-1,1", "--npy"])
    z, sevens = tf.constant([[0.5, -0.5], [-1.0, 1.0]]), tf.fill([2], 7)
    drawn = np.load(out / "generated.npy")
    np.testing.assert_allclose(drawn, tf.sigmoid(model.decoder(tf.concat(
        [z, tf.one_hot(sevens, 10)], axis=1))).numpy(), atol=1e-6)
    assert not np.allclose(drawn, model.sample(z, tf.fill([2], 3)).numpy(), atol=1e-3)  # not a 3's
    code, stderr = run_main(generate.main, ["--out-dir", out, "--label", "ten"], "generate.py",
                            capsys, monkeypatch)
    assert_one_line_error(stderr, "generate.py", "--label ten: the model's classes are 0 to 9", 2, code)


def test_network_py_shows_a_conditional_model(conditional_run, capsys):
    out, _, _ = conditional_run
    network.main(["--from", str(out)])
    shown = capsys.readouterr().out
    assert "classes 10" in shown and "negative ELBO of the blank batch" in shown


def test_a_conditional_run_resumes_as_one(conditional_run):
    """With the classes it was trained with, as config.json names them (the data's names, read
    again, may differ: a run from before they were counted from the labels)."""
    out, _, _ = conditional_run
    config = json.loads((out / "config.json").read_text())
    config["class_names"] = [f"class {i}" for i in range(10)]
    (out / "config.json").write_text(json.dumps(config))
    resumed = run_script("train.py", "--out-dir", out, "--resume", "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming" in resumed.stdout and (out / "image_at_epoch_0003.png").is_file()
    assert network.load_model(out).num_classes == 10
    assert json.loads((out / "config.json").read_text())["class_names"][0] == "class 0"


def test_the_tutorials_model_takes_no_label(tmp_path, capsys, monkeypatch):
    tf.keras.utils.set_random_seed(0)
    export.export_model(network.CVAE(2), tmp_path)
    code, stderr = run_main(generate.main, ["--out-dir", tmp_path, "--label", "3"], "generate.py",
                            capsys, monkeypatch)
    assert_one_line_error(stderr, "generate.py", "--label is for a conditional model", 2, code)
