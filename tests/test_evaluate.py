"""evaluate.py and the maths beyond the tutorial: the IWAE bound, the analytic KL,
TensorBoard logs, and every picture."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mnist_arrays, run_script, stderr_lines

import dataset
import evaluate
import network
import speedups


@pytest.fixture(scope="module")
def model() -> network.CVAE:
    tf.keras.utils.set_random_seed(5)
    return network.CVAE(2)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return dataset.binarize(make_mnist_arrays(num_train=1, num_test=128, seed=5)["x_test"])


def test_iwae_with_one_sample_is_the_elbo_estimator(model, images):
    eps = tf.random.stateless_normal((len(images), 2), seed=(1, 1))
    (logpx_z, logpz, logqz_x), _ = evaluate.log_weight_terms(model, images, eps[:, tf.newaxis])
    weights = (logpx_z + logpz - logqz_x)[:, 0]
    elbo = [-network.compute_loss(model, images[i:i + 1], eps[i:i + 1]) for i in range(len(images))]
    np.testing.assert_allclose(weights, elbo, rtol=1e-5)


def test_iwae_bound_grows_with_k(model, images):
    bounds = [evaluate.iwae_bound(model, tf.constant(images), tf.random.Generator.from_seed(k), k).mean()
              for k in (1, 10, 100)]
    assert bounds[0] < bounds[1] < bounds[2], bounds


def test_iwae_chunks_change_nothing_but_memory(model, images, monkeypatch):
    x = tf.constant(images[:8])
    whole = evaluate.iwae_bound(model, x, tf.random.Generator.from_seed(3), 50)
    monkeypatch.setattr(evaluate, "DECODES_PER_CALL", 8 * 7)  # chunks of 7 samples: 8 calls
    chunked = evaluate.iwae_bound(model, x, tf.random.Generator.from_seed(3), 50)
    # Same draws only when chunk boundaries match, so compare in distribution: close, finite.
    assert np.all(np.isfinite(chunked))
    np.testing.assert_allclose(chunked.mean(), whole.mean(), atol=1.0)


def test_iwae_is_finite_for_extreme_logits_and_large_k(images):
    tf.keras.utils.set_random_seed(6)
    extreme = network.CVAE(2)
    last = extreme.decoder.layers[-1]
    last.kernel.assign(last.kernel * 1e7)  # logits of ~1e5: importance weights of ~e^-1e6
    bound = evaluate.iwae_bound(extreme, tf.constant(images[:4]), tf.random.Generator.from_seed(0), 2000)
    assert np.all(np.isfinite(bound)) and np.all(bound < -1000)


def test_analytic_kl_is_the_mean_of_the_monte_carlo_estimate():
    mean = tf.constant([[0.5, -1.0], [2.0, 0.1]])
    logvar = tf.constant([[-1.0, 0.5], [0.2, -2.0]])
    eps = tf.random.stateless_normal((200_000, 2, 2), seed=(2, 2))
    z = mean + tf.exp(logvar / 2) * eps
    monte_carlo = tf.reduce_mean(network.log_normal_pdf(z, mean, logvar, raxis=2)
                                 - network.log_normal_pdf(z, 0.0, 0.0, raxis=2), axis=0)
    np.testing.assert_allclose(monte_carlo, speedups.analytic_kl(mean, logvar), atol=0.02)
    # The closed form: zero for q = p.
    assert float(speedups.analytic_kl(tf.zeros((1, 3)), tf.zeros((1, 3)))[0]) == 0.0


def test_elbo_parts_add_up(model, images):
    parts = {}
    for kl in network.KL_ESTIMATORS:  # the same noise for both: the same generator state
        logpx_z, kl_term = parts[kl] = evaluate._elbo_parts(model, tf.random.Generator.from_seed(4),
                                                              tf.constant(images), kl)
        eps = tf.random.Generator.from_seed(4).normal((len(images), 2))
        elbo = [-network.compute_loss(model, images[i:i + 1], eps[i:i + 1], kl) for i in range(len(images))]
        np.testing.assert_allclose(logpx_z - kl_term, elbo, rtol=1e-5)  # image by image
    np.testing.assert_array_equal(parts["mc"][0], parts["analytic"][0])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run trained with the analytic KL, then evaluated."""
    folder = tmp_path_factory.mktemp("eval")
    data = folder / "mnist.npz"
    np.savez(data, **make_mnist_arrays(num_train=256, num_test=48))
    out = folder / "run"
    result = run_script("train.py", "--data", data, "--out-dir", out, "--epochs", "2",
                        "--kl", "analytic", "--latent-dim", "3", "--learning-rate", "1e-3")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_script("evaluate.py", "--out-dir", out, "--iw-samples", "20")
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def test_evaluate_writes_a_complete_report(trained_run):
    out, result = trained_run
    report = json.loads((out / "evaluation.json").read_text())
    assert report["epoch"] == 2 and report["test_images"] == 48 and report["kl_estimator"] == "analytic"
    for figure in ("elbo", "reconstruction_log_likelihood", "kl", "iwae_log_likelihood"):
        assert np.isfinite(report[figure]["mean"]) and report[figure]["stderr"] >= 0
    assert report["iwae_log_likelihood"]["k"] == 20
    assert report["iwae_log_likelihood"]["mean"] > report["elbo"]["mean"]
    parts = report["reconstruction_log_likelihood"]["mean"] - report["kl"]["mean"]
    assert parts == pytest.approx(report["elbo"]["mean"], abs=1e-3)
    assert "IWAE bound with K = 20" in result.stdout


def test_evaluate_draws_every_picture(trained_run):
    out, _ = trained_run
    for name in ("reconstructions.png", "prior_samples.png", "latent_space.png", "interpolation.png",
                 "training_curves.png"):
        image = iio.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0, name
    assert not (out / "latent_manifold.png").exists()  # latent_dim 3: no manifold


def test_tensorboard_logs_hold_the_expected_tags(trained_run):
    out, _ = trained_run
    tags = {}
    for events in (out / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                tags.setdefault(value.tag, set()).add(event.step)
    assert tags["test/elbo"] == {0, 1, 2}
    assert tags["samples"] == {0, 1, 2}
    assert tags["epoch/seconds"] == {1, 2}
    assert tags["train/loss"] == {8, 16}  # the last step of each 8-step epoch


def test_evaluate_refuses_a_folder_without_a_run(tmp_path):
    result = run_script("evaluate.py", "--out-dir", tmp_path)
    assert result.returncode == 2
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and "no run in" in lines[0]
