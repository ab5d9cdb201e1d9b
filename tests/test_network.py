"""The tutorial's model and loss: shapes and size, and the maths against hand computations."""

from __future__ import annotations

from machinery import model_size

import numpy as np
import pytest
import tensorflow as tf

import network


@pytest.fixture(scope="module")
def model() -> network.CVAE:
    tf.keras.utils.set_random_seed(0)
    return network.CVAE(latent_dim=2)


def test_parameter_counts_are_the_tutorials(model):
    assert model_size.count_params(model.encoder) == 28_036
    assert model_size.count_params(model.decoder) == 41_953


@pytest.mark.parametrize("latent_dim", [1, 2, 5])
def test_shapes(latent_dim):
    model = network.CVAE(latent_dim)
    x = tf.zeros((3, 28, 28, 1))
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (3, latent_dim)
    z = model.reparameterize(mean, logvar)
    assert z.shape == (3, latent_dim)
    assert model.decode(z).shape == (3, 28, 28, 1)
    probabilities = model.sample(tf.zeros((4, latent_dim)))
    assert probabilities.shape == (4, 28, 28, 1)
    assert 0.0 <= float(tf.reduce_min(probabilities)) <= float(tf.reduce_max(probabilities)) <= 1.0
    assert model.sample().shape == (100, 28, 28, 1)  # the tutorial's default: 100 prior draws


def test_reparameterize_is_mean_plus_sigma_times_eps(model):
    mean = tf.constant([[0.5, -1.0]])
    logvar = tf.constant([[np.log(4.0), np.log(0.25)]], tf.float32)
    eps = tf.constant([[1.0, 2.0]])
    # sigma = exp(logvar / 2) = (2, 0.5): z = (0.5 + 2 * 1, -1 + 0.5 * 2)
    np.testing.assert_allclose(model.reparameterize(mean, logvar, eps), [[2.5, 0.0]], rtol=1e-6)


def test_log_normal_pdf_is_the_gaussian_log_density():
    rng = np.random.default_rng(1)
    x, mean = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    variance = rng.uniform(0.1, 3.0, size=(5, 3))
    density = np.exp(-((x - mean) ** 2) / (2 * variance)) / np.sqrt(2 * np.pi * variance)
    expected = np.log(density).sum(axis=1)
    result = network.log_normal_pdf(tf.constant(x, tf.float32), tf.constant(mean, tf.float32),
                                    tf.constant(np.log(variance), tf.float32))
    np.testing.assert_allclose(result, expected, rtol=1e-5)
    # The standard normal at 0, in d dimensions: -d/2 log(2 pi).
    np.testing.assert_allclose(network.log_normal_pdf(tf.zeros((1, 4)), 0.0, 0.0),
                               [-2 * np.log(2 * np.pi)], rtol=1e-6)


def test_loss_matches_a_hand_computation(model):
    rng = np.random.default_rng(2)
    x = (rng.random((4, 28, 28, 1)) < 0.3).astype(np.float32)
    eps = rng.normal(size=(4, 2)).astype(np.float32)

    mean, logvar = (t.numpy().astype(np.float64) for t in model.encode(x))
    z = mean + np.exp(logvar / 2) * eps
    p = 1 / (1 + np.exp(-model.decode(tf.constant(z, tf.float32)).numpy().astype(np.float64)))
    log_px_z = (x * np.log(p) + (1 - x) * np.log(1 - p)).sum(axis=(1, 2, 3))
    log_pz = (-0.5 * z**2 - 0.5 * np.log(2 * np.pi)).sum(axis=1)
    log_qz_x = (-0.5 * eps**2 - 0.5 * logvar - 0.5 * np.log(2 * np.pi)).sum(axis=1)
    expected_elbo = log_px_z + log_pz - log_qz_x

    x, eps = tf.constant(x), tf.constant(eps)
    per_example = [-network.compute_loss(model, x[i:i + 1], eps[i:i + 1]) for i in range(4)]
    np.testing.assert_allclose(per_example, expected_elbo, rtol=1e-4)
    np.testing.assert_allclose(network.compute_loss(model, x, eps), -expected_elbo.mean(), rtol=1e-4)


def test_the_analytic_kl_loss_is_reconstruction_minus_the_closed_form(model):
    rng = np.random.default_rng(3)
    x = tf.constant((rng.random((4, 28, 28, 1)) < 0.3).astype(np.float32))
    eps = tf.constant(rng.normal(size=(4, 2)).astype(np.float32))
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar, eps)
    cross_ent = tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=model.decode(z))
    logpx_z = -tf.reduce_sum(cross_ent, axis=[1, 2, 3])
    kl = 0.5 * tf.reduce_sum(tf.exp(logvar) + mean**2 - 1.0 - logvar, axis=1)
    np.testing.assert_allclose(network.compute_loss(model, x, eps, kl="analytic"),
                               -tf.reduce_mean(logpx_z - kl), rtol=1e-5)


def test_fp32_and_bf16_models_agree():
    x = tf.constant((np.random.default_rng(0).random((32, 28, 28, 1)) < 0.3).astype(np.float32))
    eps = tf.random.stateless_normal((32, 2), seed=(1, 2))
    losses = []
    for precision in ("fp32", "bf16"):
        tf.keras.utils.set_random_seed(1)
        losses.append(float(network.compute_loss(network.CVAE(2, precision), x, eps)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
