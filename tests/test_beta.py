"""--beta: the training loss weighs the KL term; the figures reported stay the ELBO's. (A
script run with --beta is test_conditional's.)"""

from __future__ import annotations

from machinery import data_files

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mnist_arrays, train_settings

import dataset
import evaluate
import network
import train


@pytest.mark.parametrize("kl", network.KL_ESTIMATORS)
def test_beta_weighs_the_kl_term_and_one_is_the_elbo_to_the_bit(kl):
    tf.keras.utils.set_random_seed(3)
    model = network.CVAE(2)
    codes = model.encoder.layers[-1]
    codes.kernel.assign(codes.kernel * 30)  # posteriors away from the prior: a KL of many nats
    x = dataset.binarize(make_mnist_arrays(num_train=8, num_test=0, seed=3)["x_train"])
    eps = tf.random.stateless_normal((8, 2), seed=(3, 4))
    elbo_loss = network.compute_loss(model, x, eps, kl)
    assert network.compute_loss(model, x, eps, kl, beta=1.).numpy() == elbo_loss.numpy()
    # The parts by themselves: beta must weigh log q(z|x) - log p(z), not log p(x|z).
    parts = network.elbo_terms(model, x, eps, kl)
    logpx_z, logpz, logqz_x = (part.numpy().astype(np.float64) for part in parts)
    assert np.mean(logqz_x - logpz) > 1  # nats: far more than rtol 1e-5 of a loss of ~550
    for beta in (0., 4.):
        np.testing.assert_allclose(network.compute_loss(model, x, eps, kl, beta=beta),
                                   -np.mean(logpx_z - beta * (logqz_x - logpz)), rtol=1e-5)


def test_a_larger_beta_lowers_the_kl_and_the_reported_elbo_is_the_elbo(tmp_path):
    arrays = make_mnist_arrays(num_train=640, num_test=64, seed=2)
    train_images, test_images = (data_files.with_channels(arrays[key]) for key in ("x_train", "x_test"))
    figures = {}
    for beta in (1., 4.):
        tf.keras.utils.set_random_seed(2)
        model = network.CVAE(2)
        settings = train_settings("--epochs", "3", "--seed", "2", "--beta", str(beta))
        metrics = train.fit(model, tf.keras.optimizers.Adam(1e-3), settings, train_images, test_images,
                            out_dir=tmp_path / str(beta))
        figures[beta] = evaluate.evaluate_run(model, dataset.binarize(test_images).numpy(),
                                              iw_samples=2, kl="mc", seed=0)
        # The test ELBO of metrics.csv is the ELBO (B = 1) of the trained model, as evaluate.py's.
        assert abs(metrics[-1]["test_elbo"] - figures[beta]["elbo"]["mean"]) < 3
    assert figures[4.]["kl"]["mean"] < 0.5 * figures[1.]["kl"]["mean"], figures
